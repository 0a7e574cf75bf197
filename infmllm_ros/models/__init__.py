"""Language models (LLaMA/Qwen2 decoder), checkpoint loaders, tokenizers and presets."""
from .decoder import Decoder, DecoderConfig
from .gguf_loader import load_gguf
from .hf_loader import load_hf_checkpoint
from .presets import smollm2_gguf_path
from .tokenizer import ChatTokenizer

__all__ = ["Decoder", "DecoderConfig", "load_gguf", "load_hf_checkpoint", "smollm2_gguf_path", "ChatTokenizer"]
