"""InternVL3: transformers' InternViT + pixel shuffle + MLP projector, our Qwen2 decoder.

The InternVL architecture (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints such as
OpenGVLab/InternVL3-1B-hf): a ViT encodes one 448 px tile into 32x32 patch features (its CLS
token dropped), a pixel shuffle folds each 2x2 block into one token (``downsample_ratio`` 0.5:
256 tokens), and a LayerNorm + MLP projects them into a Qwen2.5 language model with 1-D RoPE,
between ``<img>`` and ``</img>``. What is reused from transformers: the tower, the pixel shuffle
(``InternVLModel.pixel_shuffle``), the projector and the image processor
(``GotOcr2ImageProcessorPil``: resize to the tile, CLIP normalisation). What is ours: the
decoder (cache, eviction, scoring) and the frame chunk.

Frames are single tiles (``crop_to_patches=False``): InternVL's dynamic tiling would cost up to
13x the tokens per frame. The frame time reaches the model as text, as for every family.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .family import VisionInputs, VisionLanguageModel
from .hf_loader import load_vlm_parts, read_vlm_config
from .tokenizer import ChatTokenizer


class InternVL(VisionLanguageModel):
    """InternVL3 behind the family interface.

    The novelty summary is the mean of the frame's vision tokens, compared by cosine distance
    (threshold not calibrated on real weights here; see :class:`~.qwen_vl.QwenVL`).

    Args:
        decoder, tokenizer, name: the language model (:class:`VisionLanguageModel`).
        vision_tower: transformers' ``InternVLVisionModel``. projector: its
            ``InternVLMultiModalProjector``. processor: the image processor (one tile).
        image_token_id: ``<IMG_CONTEXT>``'s id. downsample_ratio: the pixel shuffle's scale.
        feature_layer: the tower layer read (-1: the last). drop_cls: the ``default`` feature
            selection (the CLS token dropped).
        frame_tokens: vision tokens per frame.
    """

    family = "internvl"
    novelty_threshold = 0.1
    image_open = "<img>"
    image_close = "</img>\n"

    def __init__(
        self,
        decoder,
        tokenizer,
        name: str,
        vision_tower: torch.nn.Module,
        projector: torch.nn.Module,
        processor,
        image_token_id: int,
        downsample_ratio: float,
        feature_layer: int,
        drop_cls: bool,
        frame_tokens: int,
    ):
        super().__init__(decoder, tokenizer, name, max_vision_tokens=frame_tokens)
        self.tower = _Tower(vision_tower, projector, downsample_ratio, feature_layer, drop_cls)
        self.processor, self.image_token_id = processor, image_token_id

    def vision_inputs(self, rgb: np.ndarray) -> VisionInputs:
        """The processor's one tile ``[1, 3, S, S]``."""
        pixels = self.processor(images=[rgb], crop_to_patches=False, return_tensors="pt")["pixel_values"]
        return VisionInputs((pixels.to(self.device, next(self.tower.parameters()).dtype),), (1, self.max_vision_tokens))

    def vision_tower(self, inputs: VisionInputs) -> torch.nn.Module:
        """InternViT + pixel shuffle + projector (as transformers' ``InternVLModel.get_image_features``):
        pixels -> ``[frame_tokens, hidden]``."""
        return self.tower


class _Tower(torch.nn.Module):
    """``forward(pixels [1, 3, S, S])`` -> vision tokens ``[(S/p * ratio)**2, hidden]``."""

    def __init__(
        self, vision_tower: torch.nn.Module, projector: torch.nn.Module, ratio: float, layer: int, drop_cls: bool
    ):
        super().__init__()
        self.vision_tower, self.projector, self.ratio, self.layer, self.drop_cls = (
            vision_tower,
            projector,
            ratio,
            layer,
            drop_cls,
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from transformers.models.internvl.modeling_internvl import InternVLModel

        out = self.vision_tower(pixel_values=pixels, output_hidden_states=self.layer != -1)
        features = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if self.drop_cls:
            features = features[:, 1:]
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(1, side, side, -1)
        # transformers' pixel shuffle reads no attribute of its model: called with none
        features = InternVLModel.pixel_shuffle(None, features, scale_factor=self.ratio)
        return self.projector(features.reshape(1, -1, features.shape[-1]))[0]


def load_internvl(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> InternVL:
    """An InternVL3 ``-hf`` checkpoint folder (``InternVLForConditionalGeneration``).

    Raises:
        FileNotFoundError: a missing file (named). ValueError: tensors that disagree with the
            config, a config without ``image_token_id``, or a layout other than one tile.
    """
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector, InternVLVisionModel

    path = Path(path)
    hf, cfg = read_vlm_config(path, attention_bias=True)  # Qwen2: q/k/v biases
    decoder, parts, full_cfg = load_vlm_parts(
        path,
        cfg,
        {
            "vision tower": (
                ("model.vision_tower.", "vision_tower."),
                lambda c: InternVLVisionModel._from_config(c.vision_config),
            ),
            "projector": (("model.multi_modal_projector.", "multi_modal_projector."), InternVLMultiModalProjector),
        },
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    )
    tower, projector = parts["vision tower"], parts["projector"]
    vcfg = full_cfg.vision_config
    side = vcfg.image_size[0] // vcfg.patch_size[0]
    frame_tokens = int(side * full_cfg.downsample_ratio) ** 2
    layer = full_cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}/config.json: vision_feature_layer {layer!r}: one layer is supported")
    processor = GotOcr2ImageProcessorPil.from_pretrained(str(path), crop_to_patches=False)
    tokenizer = ChatTokenizer.from_hf_dir(path)
    return InternVL(
        decoder.to(device, dtype),
        tokenizer,
        path.name,
        tower.to(device, dtype).eval(),
        projector.to(device, dtype).eval(),
        processor,
        int(hf["image_token_id"]),
        float(full_cfg.downsample_ratio),
        layer,
        full_cfg.vision_feature_select_strategy == "default",
        frame_tokens,
    )
