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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .reference import saddle_select


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


class EvictionPolicy:
    """Base policy: chooses which slots of each row survive an eviction.

    Args:
        sinks: protected leading slots (tokens).
        recent: protected trailing slots (tokens).

    Raises:
        ValueError: on negative counts.
    """

    name = "base"
    score_spec: ScoreSpec | None = None
    evicts = True

    def __init__(self, sinks: int, recent: int):
        if sinks < 0 or recent < 0:
            raise ValueError(f"sinks ({sinks}) and recent ({recent}) must be >= 0")
        self.sinks = sinks
        self.recent = recent

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

    def select(self, scores: torch.Tensor | None, rows: tuple[int, int], length: int, budget: int,
               device: torch.device) -> torch.Tensor:
        """Kept slots ``int64 [layers, kv_heads, budget]``, ascending.

        Args:
            scores: float32 ``[layers, kv_heads, length]`` (policies with a score spec) or None.
                On CUDA the :mod:`.kernels` selection runs, on CPU the torch reference.
            rows: ``(layers, kv_heads)``.
            length: occupied slots before eviction (> budget).
            budget: slots to keep.
        """
        sinks, recent = self.protected(budget)
        if scores is None:
            scores = torch.zeros(*rows, length, device=device)
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
        ValueError: for ``beta < 0`` or ``decay`` outside [0, 1].
    """

    name = "inf_mllm"

    def __init__(self, sinks: int, recent: int, beta: float = DEFAULT_BETA, decay: float = DEFAULT_DECAY):
        super().__init__(sinks, recent)
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.score_spec = ScoreSpec(beta=float(beta), normalise=True, decay=float(decay))


POLICIES = {p.name: p for p in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, InfMLLMPolicy)}


def make_policy(name: str, sinks: int = 4, recent: int = 64, beta: float = DEFAULT_BETA,
                decay: float = DEFAULT_DECAY) -> EvictionPolicy:
    """Build a policy by name (one of :data:`POLICIES`).

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or bad counts.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown KV-cache policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == InfMLLMPolicy.name:
        return InfMLLMPolicy(sinks, recent, beta=beta, decay=decay)
    return POLICIES[name](sinks, recent)
