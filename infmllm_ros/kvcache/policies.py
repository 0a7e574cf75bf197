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
few vision tokens leave most rows within minutes (bench/results/README.md, "Camera memory").
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .reference import chunk_column_scores, saddle_select, visible_counts
from .slots import SlotKind


class PolicySettingError(ValueError):
    """A cache setting out of its range.

    Attributes:
        setting: the setting's name as :func:`make_policy` and :class:`~.cache.KVCache` spell it
            (``policy``, ``sinks``, ``recent``, ``vision_budget``, ``beta``, ``decay``,
            ``capacity``, ``max_chunk``, ``slack``), so a caller can name its own parameter.
    """

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


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

    A subclass states how many slots it protects (:meth:`protected`) and, if it scores slots,
    how (:class:`AttentionScorePolicy`); the selection here is the same for every policy.

    Args:
        sinks: protected leading slots (tokens).
        recent: protected trailing slots (tokens).
        vision_budget: VISION slots per row kept ahead of other saddles (tokens; 0 = none;
            only for policies that score slots).

    Raises:
        PolicySettingError: on negative counts, or a vision budget for a policy without scores.
    """

    name = "base"
    evicts = True
    #: whether :attr:`KVCache.scores` is kept for this policy (see :class:`AttentionScorePolicy`)
    scores_slots = False
    #: keyword settings the constructor takes besides the counts (:func:`make_policy`)
    settings: tuple[str, ...] = ()

    def __init__(self, sinks: int, recent: int, vision_budget: int = 0):
        for setting, value in (("sinks", sinks), ("recent", recent), ("vision_budget", vision_budget)):
            if value < 0:
                raise PolicySettingError(setting, f"{setting} must be >= 0 tokens, got {value}")
        if vision_budget and not self.scores_slots:
            raise PolicySettingError(
                "vision_budget",
                f"policy {self.name} does not score slots, so it cannot keep a vision budget; use h2o or inf_mllm",
            )
        self.sinks = sinks
        self.recent = recent
        self.vision_budget = vision_budget

    def protected(self, budget: int) -> tuple[int, int]:
        """(sinks, recent) slot counts protected when ``budget`` slots are kept."""
        return self.sinks, self.recent

    @property
    def fused_rule(self) -> tuple[float, bool] | None:
        """``(beta, normalise)`` of the window-score rule the fused CUDA kernel and the engines'
        graph compute for this policy; None when it has no scores or a rule they do not compute."""
        return None

    def check_capacity(self, capacity: int, max_chunk: int) -> None:
        """Raise :class:`PolicySettingError` unless ``capacity`` leaves room for a whole chunk
        beyond what is protected (setting ``recent`` when the recent tokens alone do not fit,
        else ``capacity``) and for the vision budget (setting ``vision_budget``)."""
        sinks, recent = self.protected(0)  # what the policy protects whatever the budget
        if self.evicts and capacity < sinks + recent + max_chunk:
            raise PolicySettingError(
                "recent" if recent >= capacity else "capacity",
                f"capacity {capacity} is smaller than sinks ({sinks}) + recent ({recent}) + chunk "
                f"({max_chunk}) = {sinks + recent + max_chunk} tokens",
            )
        if self.vision_budget and capacity < sinks + recent + self.vision_budget:
            raise PolicySettingError(
                "vision_budget",
                f"vision_budget {self.vision_budget} does not fit beside sinks ({sinks}) and recent ({recent}) "
                f"in a capacity of {capacity} tokens",
            )

    def select(
        self,
        scores: torch.Tensor | None,
        rows: tuple[int, int],
        length: int,
        budget: int,
        device: torch.device,
        kind: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Kept slots ``int64 [layers, kv_heads, budget]``, ascending.

        Args:
            scores: float32 ``[layers, kv_heads, length]`` (policies that score slots) or None.
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
            eligible[..., length - recent :] = False  # already kept
            scores = reserve_top(scores, eligible, self.vision_budget)
        if scores.is_cuda:
            return kernels.saddle_select(scores.contiguous(), length, sinks, recent, budget)
        return saddle_select(scores, sinks, recent, budget)


class AttentionScorePolicy(EvictionPolicy):
    """A policy that scores each slot by the attention its key receives (kvpress's ScorerPress:
    the subclass owns the scoring rule, the base class selects).

    The rule of this class, parameterised by the class attributes ``beta``, ``normalise`` and
    ``decay``: a chunk's window score of a slot is the softmax probability its key receives from
    each of the chunk's queries (with the bias ``beta * slot`` added to the logits), summed over
    the queries (divided by how many of them see the slot when ``normalise``) and averaged over
    the query heads of the KV head (:func:`reference.column_scores`); the carried score is
    ``decay * score + window score``. :func:`kernels.window_scores` and the engines' graph
    compute exactly this rule from ``(beta, normalise)`` (:attr:`fused_rule`). A new score signal
    is one subclass that overrides :meth:`chunk_tables` / :meth:`window_scores` (and
    :meth:`carry`), with :attr:`fused_rule` None so that only the torch path runs.
    """

    scores_slots = True
    beta = 0.0
    normalise = False
    decay = 1.0

    @property
    def fused_rule(self) -> tuple[float, bool] | None:
        return self.beta, self.normalise

    def chunk_tables(self, start: int, n: int, device: torch.device) -> tuple:
        """What :meth:`window_scores` needs for a chunk of ``n`` queries at slots
        ``start..start+n-1``, computed once per chunk and shared by its layers (opaque to the cache).
        """
        t = start + n
        bias = self.beta * torch.arange(t, device=device).to(torch.float32) if self.beta else None
        viewers = visible_counts(t, start, n, device).clamp(min=1.0) if self.normalise and n > 1 else None
        causal = torch.ones(n, n, dtype=torch.bool, device=device).triu(1) if n > 1 else None  # a decoded token: none
        return bias, causal, viewers

    def window_scores(self, logits: torch.Tensor, tables: tuple) -> torch.Tensor:
        """One layer's window scores of a chunk (the torch path).

        Args:
            logits: float32 ``[kv_heads, group, n, T]`` scaled logits of the chunk's queries over
                slots ``0..T-1`` (the chunk's own slots last).
            tables: :meth:`chunk_tables` of the chunk.

        Returns:
            float32 ``[kv_heads, T]``.
        """
        return chunk_column_scores(logits, *tables)

    def carry(self, scores: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Carried scores after a chunk: ``decay * scores + window`` (float32 ``[layers, kv_heads, T]``)."""
        return self.decay * scores + window


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


class H2OPolicy(AttentionScorePolicy):
    """Heavy hitters by accumulated attention, never decayed, + recent tokens (H2O, §3, Algorithm 1)."""

    name = "h2o"


#: inf_mllm defaults, from 50K tokens of WikiText-2 (bench/results/README.md, "Streaming
#: perplexity"): carrying scores lowers perplexity, and the bias keeps inf_mllm's lead over
#: streaming_llm from drifting away at small capacities.
DEFAULT_BETA, DEFAULT_DECAY = 5e-2, 0.9

#: inf_mllm defaults for a camera stream's memory (StreamSession, the node, engine builds, the
#: needle benchmark): the text defaults above keep too few frames for an event to survive a
#: drive; a small bias and a long carry keep them (bench/results/README.md, "Camera memory").
MEMORY_BETA, MEMORY_DECAY = 1e-3, 0.99

#: Lazy-eviction slack of a stream's cache (tokens past the capacity before an eviction runs,
#: :class:`~infmllm_ros.kvcache.KVCache`): an answer of up to 64 tokens decodes without a
#: selection or compaction, and a frame rarely pays for one. Costs 64 slots of K/V.
DEFAULT_SLACK = 64

#: Vision budget for a camera stream's memory (tokens per row; policies that score slots): the
#: VISION slots of the last novel frames are kept whatever the text around them scores
#: (bench/results/README.md, "Camera memory").
MEMORY_VISION_BUDGET = 128


class InfMLLMPolicy(AttentionScorePolicy):
    """Sinks + recent + attention saddles scored over the retrieval window (Inf-MLLM §3.2-3.3).

    Args:
        sinks, recent, vision_budget: as :class:`EvictionPolicy`.
        beta: attention-bias slope in logit units per slot. The range ``beta * capacity``
            is what matters: too small and inf_mllm drifts toward streaming_llm on long
            streams (bench/results/README.md, "Streaming perplexity").
        decay: score carry across chunks (0 = retrieval window only).
    """

    name = "inf_mllm"
    normalise = True
    settings = ("beta", "decay")

    def __init__(
        self, sinks: int, recent: int, vision_budget: int = 0, beta: float = DEFAULT_BETA, decay: float = DEFAULT_DECAY
    ):
        check_scoring(beta, decay)
        self.beta, self.decay = float(beta), float(decay)
        super().__init__(sinks, recent, vision_budget)


def check_scoring(beta: float, decay: float) -> None:
    """Raise :class:`PolicySettingError` for ``beta`` not a finite number >= 0 (logits per
    slot) or ``decay`` outside [0, 1]."""
    if not (math.isfinite(beta) and beta >= 0):
        raise PolicySettingError("beta", f"beta must be a finite number >= 0, got {beta}")
    if not 0.0 <= decay <= 1.0:
        raise PolicySettingError("decay", f"decay must be in [0, 1], got {decay}")


POLICIES = {p.name: p for p in (FullPolicy, WindowPolicy, StreamingLLMPolicy, H2OPolicy, InfMLLMPolicy)}


def scores_slots(name: str) -> bool:
    """Whether the policy called ``name`` scores slots, and so can keep a vision budget (False
    for unknown names, which :func:`make_policy` reports)."""
    return name in POLICIES and POLICIES[name].scores_slots


def make_policy(
    name: str,
    sinks: int = 4,
    recent: int = 64,
    vision_budget: int = 0,
    beta: float = DEFAULT_BETA,
    decay: float = DEFAULT_DECAY,
) -> EvictionPolicy:
    """Build a policy by name (one of :data:`POLICIES`).

    ``beta`` and ``decay`` are checked whatever the policy (one rule for every caller) and passed
    to the policies that take them (``settings``).

    Raises:
        PolicySettingError: for an unknown name (setting ``policy``; the message lists the known
            ones), bad counts, a bad ``beta`` or ``decay``, or a vision budget for a policy
            without scores.
    """
    if name not in POLICIES:
        raise PolicySettingError("policy", f"unknown KV-cache policy {name!r}; choose one of {sorted(POLICIES)}")
    check_scoring(beta, decay)
    cls = POLICIES[name]
    scoring = {"beta": beta, "decay": decay}
    return cls(sinks, recent, vision_budget, **{k: scoring[k] for k in cls.settings})
