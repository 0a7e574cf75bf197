"""Greedy decoding against the fixed-size KV cache."""
from __future__ import annotations

import torch

from ..kvcache import KVCache, SlotKind
from .backends import Backend


@torch.inference_mode()
def greedy_decode(backend: Backend, cache: KVCache, last_logits: torch.Tensor, max_new_tokens: int,
                  stop_ids: frozenset[int] = frozenset(), kind: SlotKind = SlotKind.TEXT) -> list[int]:
    """Greedy (argmax) generation, one token per chunk, each token appended to the cache.

    Args:
        backend, cache: the model's backend and this stream's cache (the prompt already in it).
        last_logits: fp32 ``[vocab]`` logits at the prompt's last position.
        max_new_tokens: most tokens to generate.
        stop_ids: token ids that end generation (the stop token itself is appended to the
            cache, so the turn is closed in context, but not returned).
        kind: slot kind recorded for generated tokens.

    Returns:
        generated token ids, without the stop token.
    """
    out: list[int] = []
    logits = last_logits
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        is_stop = tok in stop_ids
        next_logits = backend.run_chunk(backend.embed(torch.tensor([tok], device=logits.device)), cache, kind)
        if is_stop:
            break
        out.append(tok)
        logits = next_logits
    return out
