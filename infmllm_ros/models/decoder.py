"""LLaMA / Qwen2-family decoder that runs chunks against the fixed-size KV cache.

Module and parameter names follow transformers' ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``
(``model.layers.N.self_attn.q_proj.weight`` ...), so Hugging Face state dicts load directly.
One stream, no batch dimension: activations are ``[n, hidden]`` for a chunk of ``n`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..kvcache import KVCache, Rope, SlotKind
from ..kvcache.policies import EvictionPolicy


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a LLaMA/Qwen2 decoder.

    Attributes:
        vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
        head_dim: sizes (tokens / features / heads).
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: LM head shares the input embedding.
        attention_bias: q/k/v projections have biases (Qwen2).
        max_position_embeddings: trained context (tokens); the cache never exceeds it.
        mrope_section: M-RoPE frequency pairs per (t, h, w) axis (Qwen2-VL / Qwen2.5-VL), None
            for 1-D RoPE (:class:`~infmllm_ros.kvcache.Rope`).
        mrope_interleaved: the axes' pairs interleave (t, h, w, t, h, w, ...: Qwen3-VL) rather
            than follow each other in sections.
        qk_norm: an RMSNorm over each head's query and key before RoPE (Qwen3).
        deepstack_layers: how many of the first layers take a frame's DeepStack features added
            to their output at its vision tokens (Qwen3-VL); 0 for none.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    mrope_section: tuple[int, int, int] | None = None
    mrope_interleaved: bool = False
    qk_norm: bool = False
    deepstack_layers: int = 0

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if min(self.vocab_size, self.hidden_size, self.num_layers, self.head_dim) < 1:
            raise ValueError(f"invalid decoder config {self}")


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in fp32 as transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention whose keys/values live in the :class:`KVCache`.

    ``qkv_proj`` is an optional fused ``[q; k; v]`` projection (one matrix product instead of
    three, set by :mod:`.cpu_gemm`); while it is set, ``q_proj``, ``k_proj`` and ``v_proj`` are None.
    With ``cfg.qk_norm``, each head's query and key pass an RMSNorm over ``head_dim`` before RoPE
    (``q_norm``, ``k_norm``: Qwen3's attention).
    """

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)
        self.register_module("qkv_proj", None)
        self.qkv_widths = (cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)

    def project(
        self, x: torch.Tensor, rope_cs: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q ``[heads, n, d]``, k and v ``[kv_heads, n, d]`` of ``x`` ``[n, hidden]``."""
        n, d = x.shape[0], self.cfg.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_widths, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(n, self.cfg.num_heads, d), k.view(n, self.cfg.num_kv_heads, d)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        v = v.view(n, self.cfg.num_kv_heads, d).transpose(0, 1)
        return Rope.apply(q, *rope_cs), Rope.apply(k, *rope_cs), v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """Attention output ``[heads, n, d]`` -> ``[n, hidden]`` through ``o_proj``."""
        return self.o_proj(attn.transpose(0, 1).reshape(attn.shape[1], -1))

    def forward(self, x: torch.Tensor, rope_cs: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor:
        return self.output(cache.attend(self.layer, *self.project(x, rope_cs)))


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

    ``gate_up_proj`` is an optional fused ``[gate; up]`` projection (set by :mod:`.cpu_gemm`);
    while it is set, ``gate_proj`` and ``up_proj`` are None.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.register_module("gate_up_proj", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope_cs: tuple[torch.Tensor, torch.Tensor], cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope_cs, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        shape = (cfg.vocab_size, cfg.hidden_size)
        # On the meta device the decoder is built to take a checkpoint's tensors (hf_loader.load_decoder):
        # no random init there, as torch's normal_ on the meta device imports torch._dynamo (1.3 s).
        on_meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(shape)) if on_meta else nn.Embedding(*shape)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    """LLaMA/Qwen2 causal LM that reads a stream chunk by chunk through a :class:`KVCache`.

    Args:
        cfg: model shape.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.mrope_section, cfg.mrope_interleaved)
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)  # inference only

    def new_cache(
        self, capacity: int, max_chunk: int, policy: EvictionPolicy, dtype: torch.dtype | None = None, slack: int = 0
    ) -> KVCache:
        """A KV cache shaped for this model (see :class:`KVCache` for the arguments and the
        errors it raises; ``slack``: tokens appended past ``capacity`` before an eviction).

        Raises:
            ValueError: also when ``capacity + slack + max_chunk`` exceeds the trained context,
                since slot positions must stay inside it.
        """
        slots = KVCache.buffer_slots(capacity, max_chunk, slack, policy)
        if slots > self.cfg.max_position_embeddings:
            raise ValueError(
                f"capacity + slack + max_chunk = {slots} slots exceeds the model's trained context "
                f"({self.cfg.max_position_embeddings} tokens)"
            )
        p = next(self.parameters())
        return KVCache(
            layers=self.cfg.num_layers,
            kv_heads=self.cfg.num_kv_heads,
            head_dim=self.cfg.head_dim,
            capacity=capacity,
            max_chunk=max_chunk,
            policy=policy,
            rope=self.rope,
            dtype=dtype or p.dtype,
            device=p.device,
            slack=slack,
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids int64 ``[n]`` -> input embeddings ``[n, hidden]``."""
        return self.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[n, hidden]`` -> fp32 logits ``[n, vocab]``."""
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def forward(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        kind: SlotKind | torch.Tensor = SlotKind.TEXT,
        frame_id: int = -1,
        stamp_s: float = math.nan,
        mrope: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one chunk through the model and the cache (evicting if it overflows).

        Args:
            embeds: input embeddings ``[n, hidden]``, ``1 <= n <= cache.max_chunk``.
            cache: this stream's KV cache.
            kind, frame_id, stamp_s: slot metadata of the chunk (``kind`` per chunk or int8
                ``[n]`` per token, see :meth:`KVCache.begin_chunk`).
            mrope: int64 ``[3, n]`` (t, h, w) positions relative to the chunk's first position,
                for an M-RoPE model's chunk that holds vision tokens (None: 1-D positions).
                The chunk advances the position counter by ``mrope.max() + 1``
                (:meth:`KVCache.begin_chunk`).
            deepstack: ``[deepstack_layers, n, hidden]`` added to the output of the first layers
                (zeros at text tokens; :meth:`~.family.FrameChunk.deepstack_inputs`), or None.

        Returns:
            final normed hidden states ``[n, hidden]`` (apply :meth:`logits` where needed).

        Raises:
            ValueError / CacheFullError: from :meth:`KVCache.begin_chunk`, or ``mrope`` of the
                wrong shape or on a 1-D RoPE model; the cache is unchanged.
        """
        n = embeds.shape[0]
        if embeds.dim() != 2 or embeds.shape[1] != self.cfg.hidden_size:
            raise ValueError(f"embeds must be [n, {self.cfg.hidden_size}], got {tuple(embeds.shape)}")
        if mrope is not None and self.cfg.mrope_section is None:
            raise ValueError("3-D (t, h, w) positions given to a 1-D RoPE model")
        positions = cache.begin_chunk(n, kind, frame_id, stamp_s, mrope)
        try:
            x = embeds
            rope_cs = (
                self.rope.cos_sin(positions, embeds.dtype)
                if mrope is None
                else self.rope.cos_sin_mrope(positions[0] + mrope.to(positions.device), embeds.dtype)
            )
            for i, layer in enumerate(self.model.layers):
                x = layer(x, rope_cs, cache)
                if deepstack is not None and i < deepstack.shape[0]:
                    x = x + deepstack[i]
            x = self.model.norm(x)
        except BaseException:
            cache.rollback()
            raise
        cache.commit()
        return x
