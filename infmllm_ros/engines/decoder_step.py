"""The decoder step as a pure function of tensors: the graph exported to ONNX / TensorRT.

Inside the torch runtime the KV buffer lives in :class:`~infmllm_ros.kvcache.KVCache` and
attention writes into it. An engine cannot own the buffer, so the step takes it as inputs and
returns what changed; the host (cache) writes the chunk's K/V and window scores back and runs
eviction with the kernels of ``cuda/`` (or the torch reference). Same math, same order of
operations as :meth:`Decoder.forward` with a cache: RoPE positions are slot indices, attention
is :func:`~infmllm_ros.kvcache.cache.gqa_attention`, window scores are
:func:`~infmllm_ros.kvcache.reference.column_scores` (Inf-MLLM §3.2-3.3).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kvcache.cache import gqa_attention
from ..kvcache.reference import column_scores
from ..models.decoder import Decoder

INPUTS = ("embeds", "k_cache", "v_cache", "length")
OUTPUTS = ("logits", "new_k", "new_v", "scores")


class DecoderStep(nn.Module):
    """One chunk of ``n`` tokens through every layer, the KV buffer passed in explicitly.

    Args:
        decoder: the model (weights shared, not copied).
        beta: attention-bias slope of the window scores (logit units per slot).
        normalise: divide window column sums by the number of queries that see each slot.

    Forward:
        embeds: ``[1, n, hidden]`` input embeddings (model dtype), ``n >= 1``.
        k_cache, v_cache: ``[layers, kv_heads, slots, head_dim]``; slots ``0..length-1`` hold
            the stream, ``slots >= length + n`` is required, and unused slots must hold finite
            values (they are masked, but a masked 0 times NaN is NaN; the cache's are).
        length: int64 ``[1]``, occupied slots (tokens).

    Returns:
        logits: fp32 ``[1, vocab]`` of the last position.
        new_k, new_v: ``[layers, kv_heads, n, head_dim]``, post-RoPE keys / values of the chunk
            (to be written at slots ``length..length+n-1``).
        scores: fp32 ``[layers, kv_heads, slots]`` window scores of this chunk's queries over
            slots ``0..length+n-1`` (0 beyond).
    """

    def __init__(self, decoder: Decoder, beta: float = 0.0, normalise: bool = True):
        super().__init__()
        self.decoder = decoder
        self.beta = float(beta)
        self.normalise = bool(normalise)

    def forward(self, embeds: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dec = self.decoder
        n, slots = embeds.shape[1], k_cache.shape[2]
        start = length.reshape(())
        positions = start + torch.arange(n, device=embeds.device)
        rope_cs = dec.rope.cos_sin(positions, embeds.dtype)
        slot = torch.arange(slots, device=embeds.device)
        mask = slot[None, :] > positions[:, None]  # causal over stream + chunk; empty slots hidden
        write = positions[None, :, None].expand(k_cache.shape[1], n, k_cache.shape[3])
        scale = dec.cfg.head_dim ** -0.5
        x = embeds[0]
        new_k, new_v, scores = [], [], []
        for i, layer in enumerate(dec.model.layers):
            q, k, v = layer.self_attn.project(layer.input_layernorm(x), rope_cs)
            keys = k_cache[i].scatter(1, write, k)
            values = v_cache[i].scatter(1, write, v)
            out, logits = gqa_attention(q, keys, values, mask, scale)
            scores.append(column_scores(logits, start, self.beta, self.normalise))
            x = x + layer.self_attn.output(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k)
            new_v.append(v)
        logits_last = dec.logits(dec.model.norm(x[-1:]))
        return logits_last, torch.stack(new_k), torch.stack(new_v), torch.stack(scores)
