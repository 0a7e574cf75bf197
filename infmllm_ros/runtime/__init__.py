"""Streaming runtime: decoding and sessions over the fixed-size KV cache."""

from .generate import Sampling, decode

__all__ = ["Sampling", "decode"]
