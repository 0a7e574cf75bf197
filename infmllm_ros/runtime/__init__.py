"""Streaming runtime: decoding and sessions over the fixed-size KV cache."""
from .generate import greedy_decode

__all__ = ["greedy_decode"]
