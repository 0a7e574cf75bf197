"""What a cached token is; the cache records it per slot and policies may budget by it."""

from __future__ import annotations

from enum import IntEnum


class SlotKind(IntEnum):
    """What a cached token is: protected system prompt, frame text (tags, "Nothing new."), a
    vision token, or dialogue (an operator's question, its memory line, the model's answer).
    Dialogue kept in context is never taken for a frame: sightings come from VISION slots only."""

    SINK = 0
    TEXT = 1
    VISION = 2
    DIALOGUE = 3
