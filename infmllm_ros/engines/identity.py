"""What a decoder-step engine is built for: one object gives its ONNX metadata, its manifest key
and its file name, so the exporter, the builder and both engine backends cannot disagree.

A step bakes in the model's shape, its dtype, the KV buffer's slot count, the largest chunk and
the window-score rule of the cache's policy (``beta``, ``normalise``:
:attr:`~infmllm_ros.kvcache.policies.AttentionScorePolicy.fused_rule`). A runtime refuses an
engine whose identity differs from the one its model and cache need, naming the fields.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..kvcache import EvictionPolicy, KVCache
from ..models.decoder import Decoder

#: Key prefix of the identity in an ONNX file's metadata properties.
METADATA_PREFIX = "infmllm."


@dataclass(frozen=True)
class StepIdentity:
    """A decoder step's build settings.

    Attributes:
        model: the model's name (e.g. the GGUF file's stem).
        dtype: weight and KV dtype, torch's name without ``torch.`` (``float32``, ``float16``).
        slots: KV-buffer slots (``KVCache.buffer_slots``: capacity + slack + max_chunk), tokens.
        max_chunk: largest chunk (tokens).
        beta: window-score bias slope (logits per slot; 0.0 for a policy without scores).
        normalise: window scores divided by the number of queries that see a slot.
        layers, kv_heads, head_dim, hidden, vocab: the decoder's shape.
    """

    model: str
    dtype: str
    slots: int
    max_chunk: int
    beta: float
    normalise: bool
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model: str, decoder: Decoder, slots: int, max_chunk: int, policy: EvictionPolicy) -> StepIdentity:
        """The identity of ``decoder``'s step for a cache of ``slots`` / ``max_chunk`` under ``policy``.

        Raises:
            ValueError: the policy scores slots with a rule the step's graph does not compute
                (``fused_rule`` None).
        """
        rule = policy.fused_rule
        if rule is None and policy.scores_slots:
            raise ValueError(f"policy {policy.name}'s score rule has no engine graph; use the torch backend")
        rule = rule or (0.0, True)  # a policy without scores: the graph's scores go unread
        cfg = decoder.cfg
        dtype = str(next(decoder.parameters()).dtype).replace("torch.", "")
        return cls(model=model, dtype=dtype, slots=slots, max_chunk=max_chunk, beta=float(rule[0]),
                   normalise=bool(rule[1]), layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, hidden=cfg.hidden_size, vocab=cfg.vocab_size)

    @classmethod
    def for_cache(cls, model: str, decoder: Decoder, cache: KVCache) -> StepIdentity:
        """:meth:`of` with the slots, chunk and policy of ``cache``."""
        return cls.of(model, decoder, cache.k.shape[2], cache.max_chunk, cache.policy)

    def fields(self) -> dict[str, str]:
        """Every setting as a string (``repr`` for ``beta``, so it round-trips exactly): the
        manifest key of a TensorRT engine, compared field by field."""
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in asdict(self).items()}

    def metadata(self) -> dict[str, str]:
        """:meth:`fields` under :data:`METADATA_PREFIX`, for an ONNX file's metadata properties."""
        return {METADATA_PREFIX + k: v for k, v in self.fields().items()}

    def stem(self) -> str:
        """File name without suffix: ``{model}.{dtype}.slots{S}.chunk{C}.beta{b}.{norm|sum}``."""
        return (f"{self.model}.{self.dtype}.slots{self.slots}.chunk{self.max_chunk}.beta{self.beta:g}"
                f".{'norm' if self.normalise else 'sum'}")
