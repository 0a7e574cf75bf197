"""Torch reference of the KV-cache maintenance math: the specification of the CUDA kernels.

Three operations, each with the exact semantics the kernels in ``cuda/`` must reproduce
(indices bit-for-bit, values to fp16 tolerance):

* :func:`window_scores` - Inf-MLLM retrieval-window column scores (Ning et al. 2024,
  "Inf-MLLM", §3.2 attention saddles, §3.3 attention bias).
* :func:`saddle_select` - keep sinks + recent + top-k saddles per (layer, kv_head) row.
* :func:`kv_compact` - gather kept K/V to the front of each row, re-rotating keys.

Buffer layout everywhere: ``[layers, kv_heads, slots, head_dim]``; a slot's RoPE position
is its index.
"""

from __future__ import annotations

import torch

from .rope import Rope


def visible_counts(total: int, q_start: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """Number of window queries that can see each key under causal attention.

    Query ``i`` (slot ``q_start + i``, ``0 <= i < window``) sees key ``j`` iff ``j <= q_start + i``.

    Returns:
        float32 tensor ``[total]``: ``window`` for ``j <= q_start``, ``window - (j - q_start)``
        for keys inside the window, 0 beyond it.
    """
    j = torch.arange(total, device=device)
    return (window - (j - q_start).clamp(min=0)).clamp(min=0).to(torch.float32)


def window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_start: int,
    scale: float,
    beta: float = 0.0,
    normalise: bool = True,
) -> torch.Tensor:
    """Column attention scores of one layer's cached keys, seen from a window of queries.

    For every key slot ``j``: softmax (fp32, causal) of ``q·k * scale + beta * j`` over the keys,
    summed over the window queries that see ``j``, divided by their count when ``normalise``
    (Inf-MLLM's local sum, normalised so young keys are not penalised for having fewer
    viewers), then averaged over the query heads of each KV head (GQA group mean).
    The bias ``beta * j`` (Inf-MLLM §3.3, "attention bias") is applied to the logits used for
    scoring only, never to the model's own attention; larger ``beta`` favours newer slots.
    With ``beta=0, normalise=False`` this is H2O's accumulated attention (Zhang et al. 2023).

    Args:
        q: post-RoPE queries ``[q_heads, W, head_dim]``, any float dtype.
        k: post-RoPE keys ``[kv_heads, T, head_dim]`` (slots ``0..T-1``), ``T >= q_start + W``
           is not required: keys beyond the last query are simply invisible.
        q_start: slot of the first window query.
        scale: logit scale, usually ``head_dim ** -0.5``.
        beta: attention-bias slope per slot (logit units).
        normalise: divide by the visible-query count.

    Returns:
        float32 ``[kv_heads, T]``; 0 for keys no query sees.

    Raises:
        ValueError: on mismatched head dims or a query-head count not divisible by kv_heads.
    """
    hq, w, d = q.shape
    hkv, t, dk = k.shape
    if d != dk:
        raise ValueError(f"q head_dim {d} != k head_dim {dk}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    qf = q.to(torch.float32).reshape(hkv, hq // hkv, w, d)
    logits = torch.matmul(qf, k.to(torch.float32).transpose(-1, -2)[:, None]) * scale
    return column_scores(logits, q_start, beta, normalise)


def column_scores(logits: torch.Tensor, q_start: int, beta: float = 0.0, normalise: bool = True) -> torch.Tensor:
    """:func:`window_scores` from precomputed scaled logits (no mask, no bias).

    Lets the cache reuse the logits of the model's own attention instead of a second QK^T.

    Args:
        logits: float32 ``[kv_heads, group, W, T]`` = ``q·k * scale`` for the window queries.
        q_start, beta, normalise: as in :func:`window_scores`.

    Returns:
        float32 ``[kv_heads, T]``.
    """
    _, _, w, t = logits.shape
    slots = torch.arange(t, device=logits.device)
    if beta:
        logits = logits + beta * slots.to(torch.float32)
    mask = slots[None, :] > (q_start + torch.arange(w, device=logits.device))[:, None]
    probs = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1)
    col = probs.sum(dim=2)  # [hkv, group, t]
    if normalise:
        col = col / visible_counts(t, q_start, w, logits.device).clamp(min=1.0)
    return col.mean(dim=1)


def chunk_column_scores(
    logits: torch.Tensor, slot_bias: torch.Tensor | None, causal: torch.Tensor | None, viewers: torch.Tensor | None
) -> torch.Tensor:
    """:func:`column_scores` of a chunk whose ``W`` queries are the last ``W`` of the ``T`` slots
    (``q_start = T - W``), with its per-call tables precomputed and the causal mask applied only to
    the chunk's own ``W x W`` corner, where it hides something: the same operations on the same
    values, so bit-identical to :func:`column_scores` (``test_reference``). The cache's CPU path.

    Args:
        logits: float32 ``[kv_heads, group, W, T]`` scaled logits.
        slot_bias: float32 ``[>= T]`` = ``beta * slot`` (None when ``beta`` is 0).
        causal: bool ``[>= W, >= W]`` upper-triangular (True above the diagonal); None for ``W = 1``.
        viewers: float32 ``[T]`` = ``visible_counts(T, T - W, W).clamp(min=1)`` to normalise by
            (None: no normalisation; ignored for ``W = 1``, where every count is 1).

    Returns:
        float32 ``[kv_heads, T]``.
    """
    _, _, w, t = logits.shape
    biased = logits + slot_bias[:t] if slot_bias is not None else logits
    if w > 1:
        if biased is logits:
            biased = logits.clone()
        biased[..., t - w :].masked_fill_(causal[:w, :w], float("-inf"))
    col = torch.softmax(biased, dim=-1).sum(dim=2)
    if viewers is not None and w > 1:
        col = col / viewers
    return col.mean(dim=1)


def saddle_select(scores: torch.Tensor, sinks: int, recent: int, budget: int) -> torch.Tensor:
    """Slots to keep in every row: protected sinks, the newest ``recent``, and top-scoring others.

    Args:
        scores: ``[..., T]`` float scores of slots ``0..T-1`` (only slots in
            ``[sinks, T - recent)`` are ranked).
        sinks: number of leading slots always kept (attention sinks / system prompt).
        recent: number of trailing slots always kept.
        budget: slots kept per row (the cache capacity), ``sinks + recent <= budget < T``.

    Returns:
        int64 ``[..., budget]`` slot indices, ascending (temporal order kept). Ties in score are
        broken toward the lower slot, so the result is deterministic.

    Raises:
        ValueError: if the counts are inconsistent.
    """
    t = scores.shape[-1]
    if sinks < 0 or recent < 0:
        raise ValueError(f"sinks ({sinks}) and recent ({recent}) must be >= 0")
    if sinks + recent > budget:
        raise ValueError(f"sinks ({sinks}) + recent ({recent}) exceed the budget ({budget})")
    if budget >= t:
        raise ValueError(f"budget ({budget}) must be smaller than the row length ({t})")
    k = budget - sinks - recent
    lead = scores.shape[:-1]
    dev = scores.device
    candidates = scores[..., sinks : t - recent]
    order = torch.sort(candidates, dim=-1, descending=True, stable=True).indices[..., :k] + sinks
    keep = torch.cat(
        (
            torch.arange(sinks, device=dev).expand(*lead, sinks),
            order,
            torch.arange(t - recent, t, device=dev).expand(*lead, recent),
        ),
        dim=-1,
    )
    return torch.sort(keep, dim=-1).values


def kv_compact(
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    rope: Rope | None,
    metadata: tuple[torch.Tensor, ...] = (),
) -> None:
    """Move the kept slots of every row to the front, in place, re-rotating keys.

    Args:
        k, v: buffers ``[layers, kv_heads, slots, head_dim]`` (same dtype/device).
        keep: int64 ``[layers, kv_heads, B]`` ascending slot indices (from :func:`saddle_select`).
        rope: the model's RoPE; keys moved from slot ``s`` to ``b`` are rotated by ``b - s``.
            ``None`` when keys are stored without RoPE.
        metadata: per-slot tensors ``[layers, kv_heads, slots]`` gathered the same way.

    After the call slots ``0..B-1`` of each row hold the kept tokens in order; slots ``>= B``
    are stale and must not be read.

    Raises:
        ValueError: on shape mismatches or out-of-range indices.
    """
    if k.shape != v.shape:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} differ")
    if keep.shape[:2] != k.shape[:2]:
        raise ValueError(f"keep rows {tuple(keep.shape[:2])} != buffer rows {tuple(k.shape[:2])}")
    b = keep.shape[-1]
    if b and (int(keep.min()) < 0 or int(keep.max()) >= k.shape[2]):
        raise ValueError("keep indices out of the buffer's slot range")
    layers, heads, slots, d = k.shape
    # Rows of head_dim values picked with index_select over the flattened buffer: one memcpy
    # per slot, where gather with an expanded index goes element by element.
    flat = (keep + torch.arange(layers * heads, device=keep.device).view(layers, heads, 1) * slots).reshape(-1)
    kept_k = k.reshape(-1, d).index_select(0, flat).view(*keep.shape, d)
    kept_v = v.reshape(-1, d).index_select(0, flat).view(*keep.shape, d)
    if rope is not None:
        shift = torch.arange(b, device=keep.device) - keep
        kept_k = rope.rerotate(kept_k, shift)
    k[:, :, :b] = kept_k
    v[:, :, :b] = kept_v
    for m in metadata:
        m[:, :, :b] = torch.gather(m, 2, keep)
