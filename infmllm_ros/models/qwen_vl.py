"""Qwen2.5-VL and Qwen2-VL: transformers' vision tower and merger, our Qwen2 decoder with M-RoPE.

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
image): text tokens count up on all three axes; the ``h x w`` merged vision tokens take
``(s, s + i, s + j)`` where ``s`` is the position after the text before them; the text after
the image resumes at ``s + max(h, w)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .family import FrameEncoding, VisionLanguageModel
from .hf_loader import load_decoder, load_module_state, read_safetensors, read_vlm_config, take_prefixed
from .tokenizer import ChatTokenizer
from .vision import check_rgb

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
        frame_tokens: most vision tokens per frame.
    """

    family = "qwen2_5_vl"
    novelty_metric = "cosine"
    novelty_threshold = 0.1
    image_open = "<|vision_start|>"
    image_close = "<|vision_end|>"

    def __init__(self, decoder, tokenizer, name: str, visual: torch.nn.Module, processor, image_token_id: int,
                 merge: int, frame_tokens: int):
        super().__init__(decoder, tokenizer, name, max_vision_tokens=frame_tokens)
        self.visual, self.processor, self.image_token_id, self.merge = visual, processor, image_token_id, merge

    @torch.inference_mode()
    def encode_frame(self, rgb: np.ndarray) -> FrameEncoding:
        """Vision tokens ``[h * w, hidden]`` of one frame (merged 2x2 patches, row-major).

        Raises:
            TypeError / ValueError: a frame :func:`check_rgb` or the processor refuses.
        """
        inputs = self.processor(images=[check_rgb(rgb)], return_tensors="pt")
        grid = inputs["image_grid_thw"]
        pixels = inputs["pixel_values"].to(self.device, next(self.visual.parameters()).dtype)
        embeds = self.visual(pixels, grid_thw=grid.to(self.device)).pooler_output
        _, h, w = (int(x) for x in grid[0])
        embeds = embeds.to(next(self.decoder.parameters()).dtype)
        return FrameEncoding(embeds, embeds.float().mean(0), "", (h // self.merge, w // self.merge))

    def chunk_positions(self, n_before: int, frame: FrameEncoding, n_after: int) -> torch.Tensor:
        """int64 ``[3, n]`` (t, h, w) positions of a frame chunk relative to its start."""
        h, w = frame.grid
        before = torch.arange(n_before).expand(3, -1)
        vision = torch.stack([torch.zeros(h * w, dtype=torch.int64), torch.arange(h).repeat_interleave(w),
                              torch.arange(w).repeat(h)]) + n_before
        after = torch.arange(n_after).expand(3, -1) + n_before + max(h, w)
        return torch.cat([before, vision, after], dim=1).to(self.device)


class Qwen2VL(QwenVL):
    """Qwen2-VL: the same layout and positions as Qwen2.5-VL (its tower has no window attention)."""

    family = "qwen2_vl"


def load_qwen_vl(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 frame_tokens: int = DEFAULT_FRAME_TOKENS) -> QwenVL:
    """A Qwen2.5-VL or Qwen2-VL checkpoint folder (``Qwen2_5_VLForConditionalGeneration`` /
    ``Qwen2VLForConditionalGeneration``).

    Args:
        path: folder with ``config.json``, ``*.safetensors``, ``tokenizer.json``,
            ``preprocessor_config.json`` (and the chat template).
        device, dtype: where and in what precision the weights live.
        frame_tokens: most vision tokens per frame (sets the processor's ``max_pixels``).

    Raises:
        FileNotFoundError: a missing file (named). ValueError: tensors that disagree with the
            config, or a config without the image token ids.
    """
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    hf, cfg = read_vlm_config(path, attention_bias=True)
    if cfg.mrope_section is None:
        raise ValueError(f"{path}/config.json has no mrope_section (rope_scaling / rope_parameters)")
    state = read_safetensors(path)
    vision_state = take_prefixed(state, ("model.visual.", "visual."))
    text_state = {**take_prefixed(state, ("model.language_model.", "model."), "model."),
                  **take_prefixed(state, ("lm_head.",), "lm_head.")}
    decoder = load_decoder(cfg, text_state, f"{path} (language model)")
    full_cfg = AutoConfig.from_pretrained(str(path))
    if hf.get("model_type") == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower)
    visual = Tower._from_config(full_cfg.vision_config)
    load_module_state(visual, vision_state, f"{path} (vision tower)")
    merge = int(full_cfg.vision_config.spatial_merge_size)
    cell = int(full_cfg.vision_config.patch_size) * merge
    processor = Qwen2VLImageProcessorPil.from_pretrained(
        str(path), max_pixels=frame_tokens * cell * cell, min_pixels=min(4, frame_tokens) * cell * cell)
    tokenizer = ChatTokenizer.from_hf_dir(path)
    family = Qwen2VL if hf.get("model_type") == "qwen2_vl" else QwenVL
    return family(decoder.to(device, dtype), tokenizer, path.name, visual.to(device, dtype).eval(), processor,
                  int(hf["image_token_id"]), merge, frame_tokens)
