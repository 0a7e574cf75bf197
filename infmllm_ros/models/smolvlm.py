"""SmolVLM2 (and Idefics3): transformers' SigLIP tower + pixel-shuffle connector, our LLaMA decoder.

The Idefics3 architecture: a SigLIP ViT encodes a square image, the connector folds each
``scale_factor x scale_factor`` block of patch features into one token (pixel shuffle) and
projects it into the LM's space, and a LLaMA decoder reads them between
``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``. Positions are 1-D.

Frames are single global images (the processor's ``do_image_splitting=False``): a 512 px frame
is 64 tokens for SmolVLM2, where splitting into tiles would cost 13x that per frame. The frame
time reaches the model as text, as for every family (SmolVLM2's own video prompts do the same
with "Frame from 00:05:").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .family import VisionInputs, VisionLanguageModel
from .hf_loader import load_vlm_parts, read_vlm_config
from .tokenizer import ChatTokenizer


class SmolVLM(VisionLanguageModel):
    """SmolVLM2 / Idefics3 behind the family interface.

    The novelty summary is the mean of the frame's vision tokens, compared by cosine distance
    (threshold not calibrated on real weights here; see :class:`~.qwen_vl.QwenVL`).

    Args:
        decoder, tokenizer, name: the language model (:class:`VisionLanguageModel`).
        vision_model: transformers' SigLIP tower. connector: pixel shuffle + projection.
        processor: the family's image processor (no image splitting).
        image_token_id: ``<image>``'s id. patch_size: the ViT's patch (pixels).
        frame_tokens: vision tokens per frame.
    """

    family = "smolvlm"
    novelty_metric = "cosine"
    novelty_threshold = 0.1
    image_open = "<fake_token_around_image><global-img>"
    image_close = "<fake_token_around_image>"

    def __init__(
        self,
        decoder,
        tokenizer,
        name: str,
        vision_model: torch.nn.Module,
        connector: torch.nn.Module,
        processor,
        image_token_id: int,
        patch_size: int,
        frame_tokens: int,
    ):
        super().__init__(decoder, tokenizer, name, max_vision_tokens=frame_tokens)
        self.vision_model, self.connector, self.processor = vision_model, connector, processor
        self.image_token_id, self.patch_size = image_token_id, patch_size

    def vision_inputs(self, rgb: np.ndarray) -> VisionInputs:
        """The processor's one global image ``[1, 3, S, S]`` (no splitting) and, where part of it
        is padding, its patch mask."""
        inputs = self.processor(images=[[rgb]], return_tensors="pt")
        pixels = inputs["pixel_values"][0].to(self.device, next(self.vision_model.parameters()).dtype)
        mask = inputs["pixel_attention_mask"][0].to(self.device)
        p = self.patch_size
        patch_mask = mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        return VisionInputs((pixels,), (1, self.max_vision_tokens), None if bool(patch_mask.all()) else patch_mask)

    def vision_tower(self, inputs: VisionInputs) -> torch.nn.Module:
        """SigLIP + connector (as transformers' ``SmolVLMModel.get_image_features`` for one
        image): pixels -> ``[frame_tokens, hidden]``."""
        return _Tower(self.vision_model, self.connector, self.decoder.cfg.hidden_size, inputs.mask)


class _Tower(torch.nn.Module):
    """SigLIP and the pixel-shuffle connector: ``forward(pixels)`` -> vision tokens."""

    def __init__(
        self, vision_model: torch.nn.Module, connector: torch.nn.Module, hidden: int, patch_mask: torch.Tensor | None
    ):
        super().__init__()
        self.vision_model, self.connector, self.hidden, self.patch_mask = vision_model, connector, hidden, patch_mask

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.vision_model(pixel_values=pixels, patch_attention_mask=self.patch_mask).last_hidden_state
        return self.connector(features).reshape(-1, self.hidden)


def load_smolvlm(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SmolVLM:
    """A SmolVLM2 / Idefics3 checkpoint folder (``SmolVLMForConditionalGeneration`` /
    ``Idefics3ForConditionalGeneration``).

    Raises:
        FileNotFoundError: a missing file (named). ValueError: tensors that disagree with the
            config, or a config without ``image_token_id``.
    """
    path = Path(path)
    hf, cfg = read_vlm_config(path)
    if hf.get("model_type") == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil as Processor
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Connector
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer as Tower
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil as Processor
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Connector
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer as Tower
    decoder, parts, full_cfg = load_vlm_parts(
        path,
        cfg,
        {
            "vision tower": (("model.vision_model.",), lambda c: Tower._from_config(c.vision_config)),
            "connector": (("model.connector.",), Connector),
        },
        ("model.text_model.",),
    )
    vision_model, connector = parts["vision tower"], parts["connector"]
    vcfg = full_cfg.vision_config
    frame_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 // full_cfg.scale_factor**2
    processor = Processor.from_pretrained(str(path), do_image_splitting=False)
    tokenizer = ChatTokenizer.from_hf_dir(path, extra_stop=("<end_of_utterance>", "<|im_end|>"))
    return SmolVLM(
        decoder.to(device, dtype),
        tokenizer,
        path.name,
        vision_model.to(device, dtype).eval(),
        connector.to(device, dtype).eval(),
        processor,
        int(hf["image_token_id"]),
        vcfg.patch_size,
        frame_tokens,
    )
