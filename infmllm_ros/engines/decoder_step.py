"""The decoder step as a pure function of tensors: the graph exported to ONNX / TensorRT and
compiled by ``torch.compile`` (:class:`~infmllm_ros.runtime.backends.CompiledBackend`).

Inside the torch runtime the KV buffer lives in :class:`~infmllm_ros.kvcache.KVCache` and
attention writes into it. An engine cannot own the buffer, so the step takes it as inputs and
returns what changed; the host (cache) writes the chunk's K/V and window scores back and runs
eviction with the kernels of ``cuda/`` (or the torch reference).

Same math as :meth:`Decoder.forward` with a cache (window scores are
:func:`~infmllm_ros.kvcache.reference.column_scores`, Inf-MLLM §3.2-3.3), laid out
for a static graph: each layer's queries are multiplied with the whole stored buffer (slots at
or past ``length`` masked) and, apart, with the chunk's own keys, and one softmax runs over both.
Writing the chunk into a copy of the buffer first would copy every layer's K and V per step;
kept apart, a step reads the buffer once.

RoPE positions are an input, ``[3, n]`` (t, h, w) for every family, as ONNX Runtime GenAI's
Qwen2.5-VL decoder takes ``position_ids [3, batch, n]``: an M-RoPE model rotates by all three
rows (a frame chunk's vision tokens differ on h and w), a 1-D model by row 0. The host computes
them from the cache (:meth:`KVCache.begin_chunk`: slot + position offset, plus the frame chunk's
M-RoPE layout), so one graph serves text, frame chunks and decoded tokens of every family.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.decoder import Decoder, DecoderConfig

INPUTS = ("embeds", "k_cache", "v_cache", "length", "positions")
OUTPUTS = ("logits", "new_k", "new_v", "scores")


def step_inputs(cfg: DecoderConfig) -> tuple[str, ...]:
    """The step's input names for a decoder of ``cfg``: :data:`INPUTS`, and ``deepstack`` for a
    DeepStack model (Qwen3-VL: ``[deepstack_layers, n, hidden]``, zeros for a text chunk)."""
    return INPUTS + ("deepstack",) if cfg.deepstack_layers else INPUTS


def split_attention(
    q: torch.Tensor,
    k_stored: torch.Tensor,
    v_stored: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hidden: torch.Tensor,
    scale: float,
    keys_by_reduction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA attention of a chunk over a buffer's stored keys and the chunk's own keys, kept apart.

    Args:
        q: post-RoPE queries ``[q_heads, n, head_dim]``.
        k_stored, v_stored: the buffer's ``[kv_heads, S, head_dim]`` (q's dtype).
        k, v: the chunk's post-RoPE keys and values ``[kv_heads, n, head_dim]``.
        hidden: bool ``[n, S + n]``, True where a query must not see a column (stored slots past
            the stream; the chunk's keys after the query's own).
        scale: logit scale (``head_dim ** -0.5``).
        keys_by_reduction: the stored keys' logits as a broadcast product summed over
            ``head_dim`` rather than a batched matrix product. For a decoded token (a few query
            rows a KV head) Inductor's CPU code fuses the sum into one pass over the keys, where
            its GEMM kernels are slower at three columns; for a chunk the broadcast product
            would be ``[kv_heads, rows, S, head_dim]``: export graphs keep False.

    Returns:
        (output ``[q_heads, n, head_dim]`` in q's dtype, fp32 scaled logits
        ``[kv_heads, q_heads / kv_heads, n, S + n]`` before masking: columns ``0..S-1`` are the
        buffer's slots, ``S..S+n-1`` the chunk's tokens).
    """
    hq, n, d = q.shape
    hkv, slots = k_stored.shape[:2]
    g = hq // hkv
    qg = q.reshape(hkv, g * n, d)
    # keys times queries, not queries times transposed keys: the buffer is the product's first,
    # row-major operand, so a compiler has no reason to copy it into a transposed layout
    if keys_by_reduction:
        stored = (k_stored[:, None] * qg[:, :, None]).sum(-1)
    else:
        stored = torch.bmm(k_stored, qg.transpose(1, 2)).transpose(1, 2)
    logits = (torch.cat([stored, torch.bmm(qg, k.transpose(1, 2))], dim=-1).float() * scale).view(hkv, g, n, slots + n)
    probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).to(v.dtype).view(hkv, g * n, slots + n)
    # contiguous: Inductor's GEMM template takes a row-major first operand (else ATen's bmm runs)
    out = torch.bmm(probs[..., :slots].contiguous(), v_stored) + torch.bmm(probs[..., slots:], v)
    return out.view(hq, n, d), logits


def rope_positions(slot_positions: torch.Tensor, mrope: torch.Tensor | None) -> torch.Tensor:
    """The step's ``positions`` input: int64 ``[3, n]`` from :meth:`KVCache.begin_chunk`'s 1-D
    positions ``[n]`` and a frame chunk's M-RoPE layout ``[3, n]`` relative to its first
    position (None: a text chunk, equal rows), as :meth:`Decoder.forward` rotates them."""
    if mrope is None:
        return slot_positions.expand(3, -1).contiguous()
    return slot_positions[0] + mrope.to(slot_positions.device)


class DecoderStep(nn.Module):
    """One chunk of ``n`` tokens through every layer, the KV buffer passed in explicitly.

    Args:
        decoder: the model (weights shared, not copied).
        beta: attention-bias slope of the window scores (logit units per slot).
        normalise: divide window column sums by the number of queries that see each slot.
        one_token: the step will only run single tokens (the compiled backend's decode step):
            :func:`split_attention`'s ``keys_by_reduction``.

    Forward:
        embeds: ``[1, n, hidden]`` input embeddings (model dtype), ``n >= 1``.
        k_cache, v_cache: ``[layers, kv_heads, slots, head_dim]``, or a sequence of the layers'
            ``[kv_heads, slots, head_dim]`` (``k.unbind(0)``: a compiler then sees each layer as
            its own input, at offset 0); slots ``0..length-1`` hold the stream,
            ``slots >= length + n`` is required, and unused slots must hold finite values (they
            are masked, but a masked 0 times NaN is NaN; the cache's are). Not modified.
        length: int64 ``[1]``, occupied slots (tokens).
        positions: int64 ``[3, n]`` RoPE positions (t, h, w) of the chunk's tokens
            (:func:`rope_positions`); a 1-D RoPE model reads row 0.
        deepstack: ``[deepstack_layers, n, hidden]`` added to the first layers' outputs (a
            DeepStack model's frame chunk; zeros otherwise), None for other models.

    Returns:
        logits: fp32 ``[1, vocab]`` of the last position.
        new_k, new_v: ``[layers, kv_heads, n, head_dim]``, post-RoPE keys / values of the chunk
            (to be written at slots ``length..length+n-1``).
        scores: fp32 ``[layers, kv_heads, slots]`` window scores of this chunk's queries over
            slots ``0..length+n-1`` (0 beyond).
    """

    def __init__(self, decoder: Decoder, beta: float = 0.0, normalise: bool = True, one_token: bool = False):
        super().__init__()
        self.decoder = decoder
        self.beta = float(beta)
        self.normalise = bool(normalise)
        self.one_token = bool(one_token)

    def forward(
        self,
        embeds: torch.Tensor,
        k_cache: torch.Tensor | Sequence[torch.Tensor],
        v_cache: torch.Tensor | Sequence[torch.Tensor],
        length: torch.Tensor,
        positions: torch.Tensor,
        deepstack: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dec = self.decoder
        (kv_heads, slots), n, dev = k_cache[0].shape[:2], embeds.shape[1], embeds.device
        start = length.reshape(())
        index = torch.arange(n, device=dev)
        chunk_slots = start + index
        rope_cs = (
            dec.rope.cos_sin(positions[0], embeds.dtype)
            if dec.cfg.mrope_section is None
            else dec.rope.cos_sin_mrope(positions, embeds.dtype)
        )
        slot = torch.arange(slots, device=dev)
        hidden = torch.cat([(slot >= start)[None, :].expand(n, slots), index[None, :] > index[:, None]], dim=1)
        key_slots = torch.cat([slot, chunk_slots]).to(torch.float32)
        # queries that see each column: every one sees the stream, chunk token i is seen by n - i
        viewers = torch.cat([torch.full((slots,), n, device=dev), n - index]).to(torch.float32)
        write = chunk_slots.expand(kv_heads, n)
        scale = dec.cfg.head_dim**-0.5
        x = embeds[0]
        new_k, new_v, scores = [], [], []
        for i, layer in enumerate(dec.model.layers):
            q, k, v = layer.self_attn.project(layer.input_layernorm(x), rope_cs)
            out, logits = split_attention(q, k_cache[i], v_cache[i], k, v, hidden, scale, self.one_token)
            if self.beta:
                logits = logits + self.beta * key_slots
            columns = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).sum(dim=2)
            if self.normalise:
                columns = columns / viewers
            columns = columns.mean(dim=1)  # [kv_heads, S + n]: GQA group mean
            scores.append(columns[:, :slots].scatter(1, write, columns[:, slots:]))
            x = x + layer.self_attn.output(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i]
            new_k.append(k)
            new_v.append(v)
        logits_last = dec.logits(dec.model.norm(x[-1:]))
        return logits_last, torch.stack(new_k), torch.stack(new_v), torch.stack(scores)
