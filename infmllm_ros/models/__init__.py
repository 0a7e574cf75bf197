"""Model families behind one interface (:mod:`.family`), the decoder, checkpoint loaders, tokenizers
and the registry that maps a preset, GGUF file or HF directory to a family (:func:`load_model`)."""

from .decoder import Decoder, DecoderConfig
from .family import FrameChunk, FrameEncoding, VisionLanguageModel
from .gguf_loader import load_gguf
from .hf_loader import load_hf_checkpoint
from .presets import smollm2_gguf_path
from .registry import FAMILIES, PRESETS, load_model
from .tokenizer import ChatTokenizer

__all__ = [
    "Decoder",
    "DecoderConfig",
    "FrameChunk",
    "FrameEncoding",
    "VisionLanguageModel",
    "load_gguf",
    "load_hf_checkpoint",
    "smollm2_gguf_path",
    "FAMILIES",
    "PRESETS",
    "load_model",
    "ChatTokenizer",
]
