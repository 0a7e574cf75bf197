"""Decoding against the fixed-size KV cache: greedy by default, with the repetition controls and
sampling of ``transformers.generate``.

The logits of each step pass, in ``transformers``' order, through

1. ``repetition_penalty`` (CTRL, Keskar et al. 2019, eq. in §4.1; transformers'
   ``RepetitionPenaltyLogitsProcessor``): the logit of every token already in the history is
   divided by the penalty when positive and multiplied by it when negative;
2. ``no_repeat_ngram_size`` (transformers' ``NoRepeatNGramLogitsProcessor``): a token that
   would complete an n-gram already in the history gets ``-inf``;
3. ``bad_words_ids`` (transformers' ``NoBadWordsLogitsProcessor``): the last token of each
   banned sequence gets ``-inf`` when the history ends with the rest of that sequence (a
   one-token sequence is always banned);
4. with ``temperature > 0``: division by the temperature, then nucleus filtering (``top_p``,
   Holtzman et al. 2020: keep the smallest set of most probable tokens whose mass reaches
   ``top_p``), then a draw from a ``torch.Generator`` seeded with ``seed``. With
   ``temperature == 0`` the argmax is taken (greedy, the default).

The history is the answer turn's own tokens (the question prompt and the tokens generated so
far), not the whole stream: frames enter as embeddings, and the stream's tag text repeats by
design. A stream holds hours of context, so "the prompt" of ``transformers.generate`` is the
turn here; with the same ids as a ``generate`` prompt the two choose the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kvcache import KVCache, SlotKind
from .backends import Backend


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen (``transformers.GenerationConfig`` names and meaning).

    Attributes:
        repetition_penalty: > 0; 1.0 is off. no_repeat_ngram_size: >= 0 tokens; 0 is off.
        temperature: >= 0; 0 is greedy. top_p: in (0, 1]; 1.0 keeps every token.
        seed: seeds the sampler (None: a fresh random seed per answer).
        bad_words_ids: token-id sequences the answer may not contain (each non-empty).

    Raises:
        ValueError: a value outside its range (the message names it).
    """

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not seq for seq in self.bad_words_ids):
            raise ValueError("bad_words_ids must hold non-empty token-id sequences")


GREEDY = Sampling()


def process_logits(logits: torch.Tensor, history: list[int], sampling: Sampling) -> torch.Tensor:
    """Apply the repetition penalty, the n-gram ban and the banned sequences to fp32 ``logits``
    ``[vocab]`` (a copy).

    Args:
        history: token ids the penalties look at (the turn so far).
    """
    out = logits.clone()
    if sampling.repetition_penalty != 1.0 and history:
        ids = torch.tensor(sorted(set(history)), device=out.device)
        seen = out[ids]
        out[ids] = torch.where(seen < 0, seen * sampling.repetition_penalty, seen / sampling.repetition_penalty)
    n = sampling.no_repeat_ngram_size
    if n and len(history) >= n:
        prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
        banned = {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix}
        if banned:
            out[torch.tensor(sorted(banned), device=out.device)] = -math.inf
    for seq in sampling.bad_words_ids:
        if len(seq) == 1 or (
            len(history) >= len(seq) - 1 and tuple(history[len(history) - len(seq) + 1 :]) == seq[:-1]
        ):
            out[seq[-1]] = -math.inf
    return out


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from processed fp32 ``logits`` ``[vocab]``: argmax, or a nucleus draw."""
    if sampling.temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits / sampling.temperature
    if sampling.top_p < 1.0:
        order = torch.argsort(scaled, descending=True)
        cum = torch.softmax(scaled[order], -1).cumsum(-1)
        drop = cum - torch.softmax(scaled[order], -1) >= sampling.top_p  # mass before the token already enough
        scaled = scaled.clone()
        scaled[order[drop]] = -math.inf
    probs = torch.softmax(scaled, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def decode(
    backend: Backend,
    cache: KVCache,
    last_logits: torch.Tensor,
    max_new_tokens: int,
    stop_ids: frozenset[int] = frozenset(),
    sampling: Sampling = GREEDY,
    history: list[int] | None = None,
    stop_after: Callable[[list[int]], bool] | None = None,
    close_id: int | None = None,
    kind: SlotKind = SlotKind.TEXT,
) -> list[int]:
    """Generate one token per chunk, each appended to the cache.

    Args:
        backend, cache: the model's backend and this stream's cache (the prompt already in it).
        last_logits: fp32 ``[vocab]`` logits at the prompt's last position.
        max_new_tokens: most tokens to generate.
        stop_ids: token ids that end generation (appended to the cache, so the turn is closed in
            context, but not returned).
        sampling: how tokens are chosen (:class:`Sampling`; greedy by default).
        history: the turn's prompt ids, for the repetition controls.
        stop_after: called with the tokens so far after each one; True ends the answer there
            (e.g. at the end of a sentence).
        close_id: appended to the cache when the answer ends without a stop token (budget or
            ``stop_after``), so the turn is closed in context as a stop token would close it.
        kind: slot kind recorded for generated tokens.

    Returns:
        generated token ids, without the stop token.
    """
    out: list[int] = []
    seen = list(history or [])
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.seed()) % 2**63)
    logits = last_logits
    for _ in range(max_new_tokens):
        tok = choose(process_logits(logits, seen, sampling), sampling, generator)
        next_logits = backend.run_chunk(backend.embed(torch.tensor([tok], device=logits.device)), cache, kind)
        if tok in stop_ids:
            return out
        out.append(tok)
        seen.append(tok)
        if stop_after is not None and stop_after(out):
            break
        logits = next_logits
    if close_id is not None:
        backend.run_chunk(backend.embed(torch.tensor([close_id], device=logits.device)), cache, kind, logits=False)
    return out
