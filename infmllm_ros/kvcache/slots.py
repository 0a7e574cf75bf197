"""What a cached token is; the cache records it per slot and policies may budget by it."""
from __future__ import annotations

from enum import IntEnum


class SlotKind(IntEnum):
    """What a cached token is: protected system prompt, text, or a vision token."""

    SINK = 0
    TEXT = 1
    VISION = 2
