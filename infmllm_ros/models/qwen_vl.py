"""Qwen2.5-VL, Qwen2-VL and Qwen3-VL: transformers' vision tower and merger, our decoder with M-RoPE.

What is ours: the decoder (the KV cache, eviction and its scoring run inside it) and the frame
chunk's layout and positions. What is reused from ``transformers``: the ViT with 2-D RoPE,
window attention and the patch merger (``Qwen2_5_VisionTransformerPretrainedModel``) and the
image processor (``Qwen2VLImageProcessorPil``: smart resize to a multiple of 28 px, patching,
normalisation), so a checkpoint's ``visual.*`` weights and ``preprocessor_config.json`` load as
they are.

Frames enter as images, one chunk per stored frame, not as the model's video input: a video
grid pairs consecutive frames in one temporal patch (``temporal_patch_size`` 2) and spaces t
positions by absolute time, but the stream stores one frame at a time, sparsely (novel frames
and a heartbeat every ``familiar_interval_s``), and each frame must stay one evictable chunk
with its own stamp. The frame's time reaches the model as text (``<frame t=12.0s ...>``).

M-RoPE positions of a frame chunk (transformers' ``Qwen2_5_VLModel.get_rope_index`` for one
image, and Qwen3-VL's alike): text tokens count up on all three axes; the ``h x w`` merged vision
tokens take ``(s, s + i, s + j)`` where ``s`` is the position after the text before them; the
text after the image resumes at ``s + max(h, w)``.

Qwen3-VL differs in three places, each a setting of our decoder: its language model normalises
each head's query and key (``qk_norm``), its M-RoPE interleaves the axes' frequencies
(``mrope_interleaved``), and DeepStack: the tower also returns features taken from some of its
middle blocks, one per first decoder layer, added to those layers' outputs at the frame's
vision tokens (``deepstack_layers``; transformers' ``Qwen3VLTextModel._deepstack_process``). They
travel with the frame chunk (:attr:`~.family.FrameChunk.deepstack`): a frame stays one evictable
chunk, and what DeepStack adds is already inside the K/V it leaves in the cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .family import FrameEncoding, VisionInputs, VisionLanguageModel
from .hf_loader import load_vlm_parts, read_config, read_vlm_config
from .tokenizer import ChatTokenizer

#: Vision tokens per frame by default (the processor's ``max_pixels`` is this many 28x28 px
#: cells): 64 tokens is a 224x224 px frame, small enough that a 1-4K-slot cache holds dozens.
DEFAULT_FRAME_TOKENS = 64


class QwenVL(VisionLanguageModel):
    """Qwen2.5-VL / Qwen2-VL behind the family interface.

    The novelty summary is the mean of the frame's vision tokens, compared by cosine distance.
    Its threshold is not calibrated on real weights here (none are reachable); the default
    stores a frame's vision tokens when the mean token turns by more than ~37 degrees.

    Args:
        decoder, tokenizer, name: the language model (:class:`VisionLanguageModel`).
        visual: transformers' vision tower + merger. processor: its image processor.
        image_token_id: ``<|image_pad|>``'s id. merge: ``spatial_merge_size``.
        frame_tokens: most vision tokens per frame. cell: pixels per merged token's side
            (``patch_size * merge``).
    """

    family = "qwen2_5_vl"
    novelty_metric = "cosine"
    novelty_threshold = 0.1
    image_open = "<|vision_start|>"
    image_close = "<|vision_end|>"

    def __init__(
        self,
        decoder,
        tokenizer,
        name: str,
        visual: torch.nn.Module,
        processor,
        image_token_id: int,
        merge: int,
        frame_tokens: int,
        cell: int,
    ):
        super().__init__(decoder, tokenizer, name, max_vision_tokens=frame_tokens)
        self.visual, self.processor, self.image_token_id, self.merge = visual, processor, image_token_id, merge
        self.cell = cell

    vision_traced = True  # transformers' tower loops over grid_thw.tolist(): see the base class

    @property
    def engine_frame_size(self) -> tuple[int, int]:
        """A square of ``isqrt(frame_tokens)`` merged cells (28 px for the released models): 224
        px for 64 tokens, where the processor's smart resize keeps the frame as it is."""
        side = math.isqrt(self.max_vision_tokens) * self.cell
        return side, side

    def vision_inputs(self, rgb: np.ndarray) -> VisionInputs:
        """Patches ``[h * w * merge**2, C * T * P * P]`` and the merged grid ``(h, w)``."""
        inputs = self.processor(images=[rgb], return_tensors="pt")
        _, h, w = (int(x) for x in inputs["image_grid_thw"][0])
        pixels = inputs["pixel_values"].to(self.device, next(self.visual.parameters()).dtype)
        return VisionInputs((pixels,), (h // self.merge, w // self.merge))

    def vision_tower(self, inputs: VisionInputs) -> torch.nn.Module:
        """transformers' tower + merger at the grid of ``inputs``: patches -> ``[h * w, hidden]``."""
        h, w = inputs.grid
        return _Tower(self.visual, torch.tensor([[1, h * self.merge, w * self.merge]], device=self.device))

    def chunk_positions(self, n_before: int, frame: FrameEncoding, n_after: int) -> torch.Tensor:
        """int64 ``[3, n]`` (t, h, w) positions of a frame chunk relative to its start."""
        h, w = frame.grid
        before = torch.arange(n_before).expand(3, -1)
        vision = (
            torch.stack(
                [torch.zeros(h * w, dtype=torch.int64), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)]
            )
            + n_before
        )
        after = torch.arange(n_after).expand(3, -1) + n_before + max(h, w)
        return torch.cat([before, vision, after], dim=1).to(self.device)


class _Tower(torch.nn.Module):
    """The tower at one image grid: ``forward(patches)`` -> merged vision tokens (and, for
    Qwen3-VL, its DeepStack features after them)."""

    def __init__(self, visual: torch.nn.Module, grid_thw: torch.Tensor):
        super().__init__()
        self.visual, self.grid_thw = visual, grid_thw

    def forward(self, pixels: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.visual(pixels, grid_thw=self.grid_thw)
        deepstack = getattr(out, "deepstack_features", None)
        return (out.pooler_output, *deepstack) if deepstack else out.pooler_output


class Qwen2VL(QwenVL):
    """Qwen2-VL: the same layout and positions as Qwen2.5-VL (its tower has no window attention)."""

    family = "qwen2_vl"


class Qwen3VL(QwenVL):
    """Qwen3-VL: the same layout and positions, with QK-norm, interleaved M-RoPE and DeepStack
    (see the module docstring)."""

    family = "qwen3_vl"


#: ``config.json``'s model_type -> (family class, transformers' tower class name and module).
_TOWERS = {
    "qwen2_vl": (Qwen2VL, "qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": (QwenVL, "qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": (Qwen3VL, "qwen3_vl", "Qwen3VLVisionModel"),
}


def load_qwen_vl(
    path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, frame_tokens: int = DEFAULT_FRAME_TOKENS
) -> QwenVL:
    """A Qwen2.5-VL, Qwen2-VL or Qwen3-VL checkpoint folder (``Qwen2_5_VLForConditionalGeneration``,
    ``Qwen2VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).

    Args:
        path: folder with ``config.json``, ``*.safetensors``, ``tokenizer.json``,
            ``preprocessor_config.json`` (and the chat template).
        device, dtype: where and in what precision the weights live.
        frame_tokens: most vision tokens per frame (sets the processor's ``max_pixels``).

    Raises:
        FileNotFoundError: a missing file (named). ValueError: tensors that disagree with the
            config, or a config without the image token ids.
    """
    import importlib

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    raw = read_config(path)
    kind = raw.get("model_type", "qwen2_5_vl")
    if kind not in _TOWERS:
        raise ValueError(f"{path}/config.json: model_type {kind!r} is not one of {sorted(_TOWERS)}")
    family, module, tower_name = _TOWERS[kind]
    if kind == "qwen3_vl":  # no q/k/v biases; per-head QK RMSNorm; DeepStack into the first layers
        deepstack = len(raw.get("vision_config", {}).get("deepstack_visual_indexes", ()))
        hf, cfg = read_vlm_config(path, qk_norm=True, deepstack_layers=deepstack)
    else:
        hf, cfg = read_vlm_config(path, attention_bias=True)
    if cfg.mrope_section is None:
        raise ValueError(f"{path}/config.json has no mrope_section (rope_scaling / rope_parameters)")
    tower = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), tower_name)
    decoder, parts, full_cfg = load_vlm_parts(
        path,
        cfg,
        {"vision tower": (("model.visual.", "visual."), lambda c: tower._from_config(c.vision_config))},
        ("model.language_model.", "model."),
    )
    visual = parts["vision tower"]
    merge = int(full_cfg.vision_config.spatial_merge_size)
    cell = int(full_cfg.vision_config.patch_size) * merge
    processor = Qwen2VLImageProcessorPil.from_pretrained(
        str(path), max_pixels=frame_tokens * cell * cell, min_pixels=min(4, frame_tokens) * cell * cell
    )
    tokenizer = ChatTokenizer.from_hf_dir(path)
    return family(
        decoder.to(device, dtype),
        tokenizer,
        path.name,
        visual.to(device, dtype).eval(),
        processor,
        int(hf["image_token_id"]),
        merge,
        frame_tokens,
        cell,
    )
