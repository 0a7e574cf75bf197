"""Eviction policies behind one interface: full, window, streaming_llm, h2o, inf_mllm.

Every policy keeps, per (layer, kv_head) row, ``sinks`` leading slots, ``recent`` trailing
slots and the best-scoring others up to the budget (:func:`reference.saddle_select`); they
differ only in how many slots each part gets and in how slots are scored:

==============  ======  =====================  =================================================
policy          sinks   recent                 scores
==============  ======  =====================  =================================================
full            -       -                      never evicts (the cache refuses to overflow)
window          0       budget                 none (sliding window)
streaming_llm   sinks   budget - sinks         none (Xiao et al. 2023, StreamingLLM)
h2o             sinks   recent                 accumulated attention, never decayed
                                               (Zhang et al. 2023, H2O)
inf_mllm        sinks   recent                 retrieval-window mean attention over the new
                                               chunk's queries, + attention bias ``beta * slot``,
                                               optionally carried with decay (Ning et al. 2024)
==============  ======  =====================  =================================================

Sinks are protected for h2o too, so that every score-based policy keeps the system prompt.

A policy that scores slots (h2o, inf_mllm) can also reserve a **vision budget**: per row, the
``vision_budget`` best-scoring VISION slots outside the protected parts are kept before any
other saddle. This is our addition, not Inf-MLLM's (its saddles do not tell modalities
apart): on a camera stream most slots are frame-tag text, and without a reserve an event's
few vision tokens leave most rows within minutes (bench/results/README.md, "Where the
vision slots go").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .reference import saddle_select
from .slots import SlotKind


@dataclass(frozen=True)
class ScoreSpec:
    """How a policy scores slots each chunk.

    Attributes:
        beta: attention-bias slope (logit units per slot) for scoring only.
        normalise: divide column sums by the number of window queries that see the slot.
        decay: carried score multiplier per chunk: ``score = decay * score + window_score``
            (0 = only the latest window counts, 1 = plain accumulation as H2O).
    """

    beta: float
    normalise: bool
    decay: float


#: Score given to reserved slots for the selection: above any attention score (h2o's
#: accumulated sums stay far below it), finite so every selection path compares it exactly.
RESERVED_SCORE = 1e30


def reserve_top(scores: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """Scores with each row's ``count`` best eligible slots raised to :data:`RESERVED_SCORE`.

    Args:
        scores: float32 ``[..., T]``.
        eligible: bool ``[..., T]``, the slots that may be reserved.
        count: slots reserved per row (fewer where a row has fewer eligible slots).

    Returns:
        a new float32 ``[..., T]``; ties among eligible slots go to the lower slot.
    """
    count = min(count, scores.shape[-1])
    masked = scores.masked_fill(~eligible, float("-inf"))
    top = torch.sort(masked, dim=-1, descending=True, stable=True)
    idx, lifted = top.indices[..., :count], top.values[..., :count] > float("-inf")
    out = scores.clone()
    out.scatter_(-1, idx, torch.where(lifted, RESERVED_SCORE, scores.gather(-1, idx)))
    return out


class EvictionPolicy:
    """Base policy: chooses which slots of each row survive an eviction.

    Args:
        sinks: protected leading slots (tokens).
        recent: protected trailing slots (tokens).
        vision_budget: VISION slots per row kept ahead of other saddles (tokens; 0 = none;
            only for policies that score slots).

    Raises:
        ValueError: on negative counts, or a vision budget for a policy without scores.
    """

    name = "base"
    score_spec: ScoreSpec | None = None
    evicts = True

    def __init__(self, sinks: int, recent: int, vision_budget: int = 0):
        if sinks < 0 or recent < 0 or vision_budget < 0:
            raise ValueError(f"sinks ({sinks}), recent ({recent}) and vision_budget ({vision_budget}) must be >= 0")
        if vision_budget and self.score_spec is None:
            raise ValueError(f"policy {self.name} does not score slots, so it cannot keep a vision budget; "
                             f"use h2o or inf_mllm")
        self.sinks = sinks
        self.recent = recent
        self.vision_budget = vision_budget

    def protected(self, budget: int) -> tuple[int, int]:
        """(sinks, recent) slot counts protected when ``budget`` slots are kept."""
        return self.sinks, self.recent

    def check_capacity(self, capacity: int, max_chunk: int) -> None:
        """Raise ValueError unless ``capacity`` leaves room for a whole chunk beyond what is protected."""
        sinks, recent = self.protected(0)  # what the policy protects whatever the budget
        if self.evicts and capacity < sinks + recent + max_chunk:
            raise ValueError(
                f"capacity {capacity} is smaller than sinks ({sinks}) + recent ({recent}) + chunk "
                f"({max_chunk}) = {sinks + recent + max_chunk} tokens")
        if self.vision_budget and capacity < sinks + recent + self.vision_budget:
            raise ValueError(
                f"vision_budget {self.vision_budget} does not fit beside sinks ({sinks}) and recent ({recent}) "
                f"in a capacity of {capacity} tokens")

    def select(self, scores: torch.Tensor | None, rows: tuple[int, int], length: int, budget: int,
               device: torch.device, kind: torch.Tensor | None = None) -> torch.Tensor:
        """Kept slots ``int64 [layers, kv_heads, budget]``, ascending.

        Args:
            scores: float32 ``[layers, kv_heads, length]`` (policies with a score spec) or None.
                On CUDA the :mod:`.kernels` selection runs, on CPU the torch reference.
            rows: ``(layers, kv_heads)``.
            length: occupied slots before eviction (> budget).
            budget: slots to keep.
            kind: int8 ``[layers, kv_heads, length]`` slot kinds (``SlotKind``); needed for a
                vision budget.

        Raises:
            ValueError: a vision budget and no ``kind``.
        """
        sinks, recent = self.protected(budget)
        if scores is None:
            scores = torch.zeros(*rows, length, device=device)
        if self.vision_budget:
            if kind is None:
                raise ValueError("a vision budget needs the slot kinds")
            eligible = kind == SlotKind.VISION
            eligible[..., :sinks] = False
            eligible[..., length - recent:] = False  # already kept
            scores = reserve_top(scores, eligible, self.vision_budget)
        if scores.is_cuda:
            return kernels.saddle_select(scores.contiguous(), length, sinks, recent, budget)
        return saddle_select(scores, sinks, recent, budget)


class FullPolicy(EvictionPolicy):
    """No eviction: the cache grows to its capacity and then refuses new chunks."""

    name = "full"
    evicts = False


class WindowPolicy(EvictionPolicy):
    """Sliding window: keep the newest ``budget`` tokens, nothing else."""

    name = "window"

    def protected(self, budget: int) -> tuple[int, int]:
        return 0, budget  # recent grows with the budget: nothing beyond the chunk is required


class StreamingLLMPolicy(EvictionPolicy):
    """Attention sinks + the newest ``budget - sinks`` tokens (StreamingLLM, §3.2)."""

    name = "streaming_llm"

    def protected(self, budget: int) -> tuple[int, int]:
        return self.sinks, max(0, budget - self.sinks)


class H2OPolicy(EvictionPolicy):
    """Heavy hitters by accumulated attention + recent tokens (H2O, §3, Algorithm 1)."""

    name = "h2o"
    score_spec = ScoreSpec(beta=0.0, normalise=False, decay=1.0)


#: inf_mllm defaults, from 50K tokens of WikiText-2 (bench/results/README.md). Carrying scores
#: (decay 0.9) lowers perplexity; a bias of 0.05 logit per slot keeps inf_mllm's lead over
#: streaming_llm from drifting away at 128 and 256 slots and equals 0.01 at 1024.
DEFAULT_BETA, DEFAULT_DECAY = 5e-2, 0.9

#: inf_mllm defaults for a camera stream's memory (StreamSession, the node, engine builds, the
#: needle benchmark). The text defaults above keep only the last ~60 frames at 1024 slots: a
#: 5-minute drive left no event's vision tokens in the cache. A small bias and a long carry
#: keep all six (bench/results/README.md, "Sightings").
MEMORY_BETA, MEMORY_DECAY = 1e-3, 0.99

#: Lazy-eviction slack of a stream's cache (tokens past the capacity before an eviction runs,
#: :class:`~infmllm_ros.kvcache.KVCache`): an answer of up to 64 tokens decodes without a
#: selection or compaction, and a frame rarely pays for one. Costs 64 slots of K/V.
DEFAULT_SLACK = 64

#: Vision budget for a camera stream's memory (tokens per row; policies that score slots). An
#: hour of the needle drive stores ~4 vision tokens per novel frame; 128 keeps the last ~32
#: novel frames' tokens whatever the text around them scores (bench/results/README.md).
MEMORY_VISION_BUDGET = 128


class InfMLLMPolicy(EvictionPolicy):
    """Sinks + recent + attention saddles scored over the retrieval window (Inf-MLLM §3.2-3.3).

    Args:
        sinks, recent: protected counts.
        beta: attention-bias slope in logit units per slot. The range ``beta * capacity``
            is what matters: below ~6 logits inf_mllm drifts toward streaming_llm on long
            streams (50K tokens of WikiText-2: 0.05 is best at 128 and 256 slots and equal
            to 0.01 at 1024; bench/results/README.md).
        decay: score carry across chunks (0 = retrieval window only).

    Raises:
        ValueError: for ``beta`` not a finite number >= 0 or ``decay`` outside [0, 1].
    """

    name = "inf_mllm"
    score_spec = ScoreSpec(beta=DEFAULT_BETA, normalise=True, decay=DEFAULT_DECAY)  # per instance: __init__

    def __init__(self, sinks: int, recent: int, beta: float = DEFAULT_BETA, decay: float = DEFAULT_DECAY,
                 vision_budget: int = 0):
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.score_spec = ScoreSpec(beta=float(beta), normalise=True, decay=float(decay))
        super().__init__(sinks, recent, vision_budget)


POLICIES = {p.name: p for p in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, InfMLLMPolicy)}


def scores_slots(name: str) -> bool:
    """Whether the policy called ``name`` scores slots, and so can keep a vision budget (False
    for unknown names, which :func:`make_policy` reports)."""
    return name in POLICIES and POLICIES[name].score_spec is not None


def make_policy(name: str, sinks: int = 4, recent: int = 64, beta: float = DEFAULT_BETA,
                decay: float = DEFAULT_DECAY, vision_budget: int = 0) -> EvictionPolicy:
    """Build a policy by name (one of :data:`POLICIES`).

    Raises:
        ValueError: for an unknown name (the message lists the known ones), bad counts, or a
            vision budget for a policy without scores.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown KV-cache policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == InfMLLMPolicy.name:
        return InfMLLMPolicy(sinks, recent, beta=beta, decay=decay, vision_budget=vision_budget)
    return POLICIES[name](sinks, recent, vision_budget)
