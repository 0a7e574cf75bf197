"""The fixed-size KV cache: one preallocated buffer, per-slot metadata, chunked attention, eviction.

Memory never grows with the stream: K and V are ``[layers, kv_heads, capacity + slack +
max_chunk, head_dim]`` from the start. A chunk of ``n`` tokens is written after the ``length``
occupied slots (RoPE positions ``length..length+n-1``: positions are slot indices, as in
StreamingLLM), attended, and then, if ``length + n > capacity + slack``, the policy chooses
``capacity`` slots per (layer, kv_head) row to keep and they are compacted to the front with
their keys re-rotated.

Eviction is lazy: with ``slack = 0`` every chunk that overflows the capacity evicts (selection
and compaction on every decoded token of a full cache); with ``slack = S`` chunks are appended
until the stream holds more than ``capacity + S`` tokens, and one eviction then drops at least
``S + 1``, so selection and compaction run at most once per ``S + 1`` appended tokens. Scores
accumulate over the appended chunks as they would have, so the policy decides the same kind of
thing, over a larger candidate set and less often. The price: ``S`` more slots of K/V in
memory, up to ``S`` more keys attended per query, and between evictions the model sees up to
``capacity + S`` tokens rather than exactly ``capacity``.

M-RoPE models (Qwen2-VL) give a chunk's vision tokens 2-D (h, w) positions, so an image chunk
moves the position counter by less than its length (transformers' ``get_rope_index``: the text
after an ``h x w`` image resumes ``max(h, w)`` positions later). Until the first eviction the
cache follows that exactly: ``position_offset`` (<= 0) is how far the next chunk's position
lags its slot, and each slot records its segment's lag (``rope_lag``: the t position minus the
slot of its text token, or of the first token of its image). Left alone, the lag would grow with
every frame and, after compaction, place new tokens before the sinks. So compaction, besides the
slot shift, re-rotates each kept key by minus its lag (the same rotation on all three axes,
which is a 1-D rotation, :mod:`.rope`): afterwards every text token sits at its slot, an image
keeps its 2-D layout from its first kept slot, and ``position_offset`` is 0 again. The lag is a
property of the token, so rows that kept different tokens still agree on the newest ones.
"""

from __future__ import annotations

import math

import torch

from . import kernels
from .policies import EvictionPolicy, PolicySettingError
from .reference import kv_compact
from .rope import Rope
from .slots import SlotKind


def gqa_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    mask_from: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention of a chunk over cached + chunk keys (softmax in fp32).

    Args:
        q: post-RoPE queries ``[q_heads, n, head_dim]``.
        keys, values: ``[kv_heads, T, head_dim]`` (q's dtype).
        mask: bool ``[n, T - mask_from]``, True where a query must not see a key of the slots
            ``mask_from..T-1``; the keys before ``mask_from`` are seen by every query (None: every
            query sees every key, as the single query of a decoded token does).
        scale: logit scale (``head_dim ** -0.5``).
        mask_from: first slot the mask covers (the chunk's first slot for the cache: only its own
            ``n x n`` corner is masked, not ``n x T``; 0 for an engine's whole-buffer mask).

    Returns:
        (output ``[q_heads, n, head_dim]`` in q's dtype, fp32 scaled logits
        ``[kv_heads, q_heads / kv_heads, n, T]`` before masking, for the window scores).
    """
    hq, n, d = q.shape
    hkv, t = keys.shape[:2]
    g = hq // hkv
    # Each kv head's group of query heads as one [g * n, d] matrix: plain bmm, no broadcast
    # copy of the keys/values per query head.
    logits = (torch.bmm(q.reshape(hkv, g * n, d), keys.transpose(1, 2)).float() * scale).view(hkv, g, n, t)
    if mask is None:
        masked = logits
    elif mask_from == 0:
        masked = logits.masked_fill(mask, float("-inf"))
    else:
        masked = logits.clone()
        masked[..., mask_from:].masked_fill_(mask, float("-inf"))
    probs = torch.softmax(masked, dim=-1).to(values.dtype)
    return torch.bmm(probs.view(hkv, g * n, t), values).view(hq, n, d), logits


class CacheFullError(RuntimeError):
    """A chunk does not fit and the policy does not evict (``full``)."""


class KVCache:
    """Preallocated KV buffer with slot metadata and an eviction policy.

    Args:
        layers, kv_heads, head_dim: model shape.
        capacity: slots kept after eviction (tokens), ``>= sinks + recent + max_chunk``
            (:meth:`EvictionPolicy.check_capacity`).
        max_chunk: largest chunk (tokens) written at once; the buffer has
            ``capacity + slack + max_chunk`` slots.
        slack: tokens appended beyond ``capacity`` before an eviction runs (lazy eviction, see
            the module docstring; 0 = evict whenever a chunk overflows the capacity). A policy
            that never evicts (``full``) stops at ``capacity`` whatever the slack.
        policy: eviction policy (:mod:`.policies`).
        rope: the model's RoPE, used to re-rotate keys on compaction (None: keys without RoPE).
        dtype, device: buffer dtype/device (scores and softmax are always fp32).

    Attributes:
        k, v: ``[layers, kv_heads, slots, head_dim]``.
        position: int64 ``[layers, kv_heads, slots]`` stream position of each token.
        kind: int8 ``[layers, kv_heads, slots]`` (:class:`SlotKind`).
        frame: int32 ``[layers, kv_heads, slots]`` frame id (-1 for text).
        stamp: float64 ``[layers, kv_heads, slots]`` frame time in seconds (NaN for text).
        length: occupied slots per row (same for all rows).
        position_offset: RoPE position of the next chunk minus ``length`` (tokens, <= 0; 0 for
            text-only streams and after every compaction).
        rope_lag: int64 ``[layers, kv_heads, slots]`` per-slot segment lag of an M-RoPE model
            (None for 1-D RoPE): see the module docstring.
        stream_tokens: tokens seen since the last reset.
        evicted_tokens: tokens dropped per row since the last reset.

    Raises:
        ValueError: a model shape below 1; :class:`PolicySettingError` (a ValueError) from
            :meth:`check_settings`.
    """

    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        max_chunk: int,
        policy: EvictionPolicy,
        rope: Rope | None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        slack: int = 0,
    ):
        if min(layers, kv_heads, head_dim) < 1:
            raise ValueError("layers, kv_heads and head_dim must be >= 1")
        self.check_settings(capacity, max_chunk, slack, policy)
        self.capacity = capacity
        self.max_chunk = max_chunk
        self.slack = slack if policy.evicts else 0
        self.policy = policy
        self.rope = rope
        self.scale = head_dim**-0.5
        slots = self.buffer_slots(capacity, max_chunk, slack, policy)
        shape = (layers, kv_heads, slots)
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.position = torch.zeros(shape, dtype=torch.int64, device=device)
        self.kind = torch.zeros(shape, dtype=torch.int8, device=device)
        self.frame = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.stamp = torch.full(shape, math.nan, dtype=torch.float64, device=device)
        # Our CUDA kernels take fp16/fp32 buffers; a bf16 cache on CUDA runs the torch reference.
        self._cuda_kernels = self.k.is_cuda and dtype in (torch.float16, torch.float32)
        mrope = rope is not None and rope.mrope_section is not None
        self.rope_lag = torch.zeros(shape, dtype=torch.int64, device=device) if mrope else None
        scored = policy.scores_slots
        self.scores = torch.zeros(shape, dtype=torch.float32, device=device) if scored else None
        self._window = torch.zeros(shape, dtype=torch.float32, device=device) if scored else None
        self._causal = torch.ones(max_chunk, max_chunk, dtype=torch.bool, device=device).triu(1)
        self.reset()

    @staticmethod
    def check_settings(capacity: int, max_chunk: int, slack: int, policy: EvictionPolicy) -> None:
        """The cache's rules for its sizes (tokens), checked before anything is allocated.

        Raises:
            PolicySettingError: ``max_chunk`` or ``capacity`` below 1, a negative ``slack``, or a
                capacity without room for the policy's protected slots and a chunk
                (:meth:`EvictionPolicy.check_capacity`); ``setting`` names which.
        """
        if max_chunk < 1:
            raise PolicySettingError("max_chunk", f"max_chunk must be >= 1, got {max_chunk}")
        if slack < 0:
            raise PolicySettingError("slack", f"slack must be >= 0 tokens, got {slack}")
        if capacity < 1:
            raise PolicySettingError("capacity", f"capacity must be >= 1, got {capacity}")
        policy.check_capacity(capacity, max_chunk)

    @staticmethod
    def buffer_slots(capacity: int, max_chunk: int, slack: int, policy: EvictionPolicy) -> int:
        """Slots of the K/V buffer of a cache with these settings: ``capacity + slack +
        max_chunk`` (the slack only for a policy that evicts). Engines are built for this size."""
        return capacity + (slack if policy.evicts else 0) + max_chunk

    @property
    def rows(self) -> tuple[int, int]:
        """``(layers, kv_heads)``."""
        return self.k.shape[0], self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (the part that scales with capacity)."""
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        """Forget everything (the buffers stay allocated)."""
        self.length = 0
        self.position_offset = 0
        self.pending = 0
        self.stream_tokens = 0
        self.evicted_tokens = 0

    def begin_chunk(
        self,
        n: int,
        kind: SlotKind | torch.Tensor = SlotKind.TEXT,
        frame_id: int = -1,
        stamp_s: float = math.nan,
        mrope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reserve slots for a chunk of ``n`` tokens and record their metadata.

        ``kind`` is one :class:`SlotKind` for the whole chunk, or int8 ``[n]`` per token (a
        frame chunk: its tag is TEXT, its vision tokens VISION). ``mrope``: int64 ``[3, n]``
        (t, h, w) positions relative to the chunk's first position, for an M-RoPE chunk with an
        image (None: consecutive positions); the chunk advances the position counter by
        ``mrope.max() + 1`` (see the module docstring).

        Returns:
            int64 ``[n]`` 1-D RoPE positions for the chunk: the slot indices plus
            :attr:`position_offset` (an M-RoPE model adds ``mrope`` to the first).

        Raises:
            ValueError: ``n`` outside ``1..max_chunk``, per-token kinds not of length ``n``, or
                ``mrope`` not a non-negative ``[3, n]`` on an M-RoPE cache.
            CacheFullError: the policy never evicts and the chunk would exceed capacity.
            RuntimeError: a previous chunk was begun and not committed.
        """
        if self.pending:
            raise RuntimeError("begin_chunk called twice without commit")
        if not 1 <= n <= self.max_chunk:
            raise ValueError(f"chunk of {n} tokens is outside 1..max_chunk={self.max_chunk}")
        if isinstance(kind, torch.Tensor) and kind.shape != (n,):
            raise ValueError(f"per-token kinds must be [{n}], got {tuple(kind.shape)}")
        if mrope is not None and (
            self.rope_lag is None or tuple(mrope.shape) != (3, n) or int(mrope.min()) < 0 or int(mrope.max()) >= n
        ):
            raise ValueError(
                f"mrope positions must be int [3, {n}] in 0..{n - 1} on an M-RoPE cache, got {tuple(mrope.shape)}"
            )
        if not self.policy.evicts and self.length + n > self.capacity:
            raise CacheFullError(
                f"full KV cache of {self.capacity} tokens cannot take {n} more "
                f"(holds {self.length}); use an evicting policy or a larger capacity"
            )
        s, e = self.length, self.length + n
        dev = self.k.device
        self.position[:, :, s:e] = torch.arange(self.stream_tokens, self.stream_tokens + n, device=dev)
        self.kind[:, :, s:e] = kind if isinstance(kind, torch.Tensor) else int(kind)
        self.frame[:, :, s:e] = frame_id
        self.stamp[:, :, s:e] = stamp_s
        if self.scores is not None:
            self.scores[:, :, s:e] = 0.0
        # Causal mask of the chunk's queries over their own keys (the cache before them is seen
        # by all) and the policy's scoring tables, shared by every layer; a single token's query
        # sees every key: no mask.
        self._mask = self._causal[:n, :n] if n > 1 else None
        self._tables = self.policy.chunk_tables(s, n, dev) if self.scores is not None else None
        if self.rope_lag is not None:
            self.rope_lag[:, :, s:e] = self.position_offset + self._segment_lag(n, mrope, dev)
        self.pending = n
        self._advance = n if mrope is None else int(mrope.max()) + 1
        return torch.arange(s + self.position_offset, e + self.position_offset, device=dev)

    @staticmethod
    def _segment_lag(n: int, mrope: torch.Tensor | None, device) -> torch.Tensor:
        """Per token of a chunk: its t position minus the chunk index of the first token with
        the same t (a text token: itself; an image token: the image's first token), ``[n]``."""
        if mrope is None:
            return torch.zeros(n, dtype=torch.int64, device=device)
        t = mrope[0].to(device)
        index = torch.arange(n, device=device)
        first = torch.full((int(t.max()) + 1,), n, dtype=torch.int64, device=device).scatter_reduce(
            0, t, index, reduce="amin"
        )
        return t - first[t]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the chunk's keys/values for ``layer`` and attend to cache + chunk.

        Args:
            layer: layer index.
            q: post-RoPE queries ``[q_heads, n, head_dim]``.
            k, v: post-RoPE keys and values ``[kv_heads, n, head_dim]``.

        Returns:
            attention output ``[q_heads, n, head_dim]`` in q's dtype (softmax in fp32).
        """
        n = self.pending
        s, t = self.length, self.length + n
        self.k[layer, :, s:t] = k
        self.v[layer, :, s:t] = v
        out, logits = gqa_attention(q, self.k[layer, :, :t], self.v[layer, :, :t], self._mask, self.scale, mask_from=s)
        if self.scores is not None:
            self._score_window(layer, q, logits, s, t)
        return out

    def store_chunk(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor) -> None:
        """Take the begun chunk's K/V and window scores from an engine that ran all layers.

        The engine path's counterpart of :meth:`attend` (``infmllm_ros/engines``): the engine
        attended with the buffers as inputs; here its outputs are written back.

        Args:
            k, v: post-RoPE ``[layers, kv_heads, n, head_dim]`` of the pending chunk.
            scores: fp32 ``[layers, kv_heads, >= length + n]`` window scores (ignored by policies
                without scores).

        Raises:
            ValueError: shapes that do not match the pending chunk.
        """
        n = self.pending
        s, t = self.length, self.length + n
        want = (*self.k.shape[:2], n, self.k.shape[3])
        if (
            tuple(k.shape) != want
            or tuple(v.shape) != want
            or scores.shape[:2] != self.k.shape[:2]
            or scores.shape[2] < t
        ):
            raise ValueError(
                f"engine outputs K {tuple(k.shape)}, V {tuple(v.shape)}, scores {tuple(scores.shape)} "
                f"do not fit the pending chunk (K/V {want}, scores >= {t} slots)"
            )
        self.k[:, :, s:t] = k.to(self.k.device, self.k.dtype)
        self.v[:, :, s:t] = v.to(self.v.device, self.v.dtype)
        if self.scores is not None:
            self._window[:, :, :t] = scores[:, :, :t].to(self._window.device)

    def _score_window(self, layer: int, q: torch.Tensor, logits: torch.Tensor, s: int, t: int) -> None:
        """Window scores of ``layer`` into ``_window``: the fused CUDA kernel on GPU for the rules
        it computes, else the policy's torch rule from ``logits``."""
        hq, n, d = q.shape
        rule = self.policy.fused_rule
        if (
            rule is not None
            and self._cuda_kernels
            and d in kernels.WINDOW_HEAD_DIMS
            and hq // self.k.shape[1] * n <= kernels.WINDOW_MAX_QUERIES
        ):
            kernels.window_scores(
                q[None].to(self.k.dtype).contiguous(),
                self.k[layer : layer + 1],
                t,
                s,
                self.scale,
                *rule,
                out=self._window[layer : layer + 1],
            )
        else:
            self._window[layer, :, :t] = self.policy.window_scores(logits, self._tables)

    def _state(self) -> tuple[torch.Tensor, ...]:
        extra = (self.scores,) if self.scores is not None else ()
        lag = (self.rope_lag,) if self.rope_lag is not None else ()
        return (self.k, self.v, self.position, self.kind, self.frame, self.stamp) + extra + lag

    def snapshot(self) -> dict:
        """Copy of the occupied state (for a question asked with ``keep_in_context=False``).

        Costs a copy of ``length`` slots of K/V (bytes: ``nbytes * length / slots``).
        """
        n = self.length
        return {
            "tensors": [t[:, :, :n].clone() for t in self._state()],
            "counters": (self.length, self.stream_tokens, self.evicted_tokens, self.position_offset),
        }

    def restore(self, snap: dict) -> None:
        """Return to a :meth:`snapshot` of this cache."""
        self.length, self.stream_tokens, self.evicted_tokens, self.position_offset = snap["counters"]
        for t, saved in zip(self._state(), snap["tensors"]):
            t[:, :, : self.length] = saved
        self.pending = 0

    def frames(self) -> tuple[list[int], list[float]]:
        """Frame ids with at least one token in any row, ascending, and their stamps (seconds)."""
        ids = self.frame[:, :, : self.length]
        present = ids >= 0
        if not bool(present.any()):
            return [], []
        uniq, inverse = torch.unique(ids[present], return_inverse=True)
        stamps = torch.zeros(uniq.numel(), dtype=self.stamp.dtype, device=self.stamp.device)
        stamps.scatter_(0, inverse, self.stamp[:, :, : self.length][present])  # one stamp per frame
        return uniq.tolist(), stamps.tolist()

    def rollback(self) -> None:
        """Drop a begun chunk (e.g. after an error mid-forward); the cache is as before it."""
        self.pending = 0

    def commit(self) -> int:
        """Finish the chunk: update scores, and evict down to ``capacity`` once the stream holds
        more than ``capacity + slack`` tokens.

        Returns:
            tokens evicted per row by this call (0 when the chunk fitted).
        """
        t = self.length + self.pending
        if self.scores is not None:
            self.scores[:, :, :t] = self.policy.carry(self.scores[:, :, :t], self._window[:, :, :t])
        self.length = t
        self.stream_tokens += self.pending
        self.position_offset += self._advance - self.pending
        self.pending = 0
        if t <= self.capacity + self.slack:
            return 0
        scores = self.scores[:, :, :t] if self.scores is not None else None
        keep = self.policy.select(scores, self.rows, t, self.capacity, self.k.device, self.kind[:, :, :t])
        # per-slot metadata (+ carried scores), gathered like K/V; the M-RoPE lag is settled below
        meta = tuple(m for m in self._state()[2:] if m is not self.rope_lag)
        lag = None if self.rope_lag is None else torch.gather(self.rope_lag[:, :, :t], 2, keep)
        if self._cuda_kernels:
            kernels.kv_compact(self.k, self.v, keep, self.rope, meta)
        else:
            # One layer at a time: the reference's gathers and re-rotation allocate ~6 copies of
            # what they move, ~150 MB at once for SmolLM2 at 1024 slots. Allocator churn of that
            # size shows as RSS swings of +-10% and glibc keeps some of it (a step-wise rise);
            # per layer it is 1/layers of that.
            for layer in range(self.k.shape[0]):
                rows = slice(layer, layer + 1)
                kv_compact(self.k[rows], self.v[rows], keep[rows], self.rope, tuple(m[rows] for m in meta))
        if lag is not None:  # M-RoPE: every kept token back to its slot (module docstring)
            if bool(lag.any()):
                b = self.capacity
                for layer in range(self.k.shape[0]):
                    self.k[layer, :, :b] = self.rope.rerotate(self.k[layer, :, :b], -lag[layer])
            self.rope_lag.zero_()
            self.position_offset = 0
        self.length = self.capacity
        evicted = t - self.capacity
        self.evicted_tokens += evicted
        return evicted
