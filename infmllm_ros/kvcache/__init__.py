"""Fixed-size KV cache with Inf-MLLM eviction: buffer, policies, torch reference math."""

from .cache import CacheFullError, KVCache
from .policies import DEFAULT_SLACK, POLICIES, EvictionPolicy, make_policy
from .rope import Rope
from .slots import SlotKind

__all__ = [
    "CacheFullError",
    "KVCache",
    "SlotKind",
    "POLICIES",
    "EvictionPolicy",
    "make_policy",
    "Rope",
    "DEFAULT_SLACK",
]
