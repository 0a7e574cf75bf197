"""What an engine is built for: one object gives its ONNX metadata, its manifest key and its
file name, so the exporter, the builder and both engine backends cannot disagree.

A model runs as three engines (ONNX Runtime GenAI splits Qwen2.5-VL the same way):

* ``step``: the decoder step (:mod:`.decoder_step`). It bakes in the model's shape, its dtype,
  the KV buffer's slot count, the largest chunk and the window-score rule of the cache's policy
  (``beta``, ``normalise``: :attr:`~infmllm_ros.kvcache.policies.AttentionScorePolicy.fused_rule`);
* ``vision``: the family's vision tower and projector at one frame size;
* ``embed``: the token-embedding lookup.

Each engine's key is the subset of :class:`StepIdentity`'s fields it depends on
(:data:`KIND_FIELDS`), so a vision engine is not rebuilt when only the cache's capacity changes.
A runtime refuses an engine whose key differs from the one its model and cache need, naming
the fields.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..kvcache import EvictionPolicy, KVCache
from ..models.decoder import Decoder

if TYPE_CHECKING:
    from ..models.family import VisionLanguageModel

#: Key prefix of the identity in an ONNX file's metadata properties.
METADATA_PREFIX = "infmllm."

#: The fields each engine kind depends on (None: all of them).
KIND_FIELDS: dict[str, tuple[str, ...] | None] = {
    "step": None,
    "vision": ("model", "family", "checkpoint", "dtype", "hidden", "frame_size", "vision_input", "frame_tokens"),
    "embed": ("model", "family", "checkpoint", "dtype", "hidden", "vocab"),
}

_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_digest(path: str | Path) -> str:
    """First 16 hex digits of the SHA-256 of a checkpoint's files: a GGUF file, or an HF
    folder's ``config.json`` and ``*.safetensors`` in name order. Remembered per file size and
    modification time within a process (a 3B checkpoint is ~7 GB: seconds to read).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    files = [path] if path.is_file() else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    total = hashlib.sha256()
    for f in files:
        stat = f.stat()
        key = (str(f.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _DIGESTS:
            with open(f, "rb") as fh:
                _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
        total.update(f"{f.name}:{_DIGESTS[key]}\n".encode())
    return total.hexdigest()[:16]


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
        family: the model family (``models.registry.FAMILIES``; "" for a bare decoder).
        checkpoint: :func:`checkpoint_digest` of the weights ("" when unknown).
        frame_size: ``WxH`` px frames are resized to for the vision engine, ``any`` when the
            family's processor fixes the pixel shape itself, "" for a bare decoder.
        vision_input: the vision engine's static input shape(s) (``1x3x224x224``).
        frame_tokens: most vision tokens per frame.
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
    family: str = ""
    checkpoint: str = ""
    frame_size: str = ""
    vision_input: str = ""
    frame_tokens: int = 0

    @classmethod
    def of(
        cls,
        model: str,
        decoder: Decoder,
        slots: int,
        max_chunk: int,
        policy: EvictionPolicy,
        vlm: VisionLanguageModel | None = None,
    ) -> StepIdentity:
        """The identity of ``decoder``'s step for a cache of ``slots`` / ``max_chunk`` under ``policy``;
        with ``vlm`` (the model ``decoder`` belongs to), also its family, checkpoint and frame shape.

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
        vision = {}
        if vlm is not None:
            size = vlm.engine_frame_size
            example = vlm.vision_inputs(example_frame(size))
            vision = dict(
                family=vlm.family,
                checkpoint=checkpoint_digest(vlm.checkpoint) if vlm.checkpoint else "",
                frame_size=f"{size[0]}x{size[1]}" if size else "any",
                vision_input=",".join("x".join(map(str, t.shape)) for t in example.pixels),
                frame_tokens=vlm.max_vision_tokens,
            )
        return cls(
            model=model,
            dtype=dtype,
            slots=slots,
            max_chunk=max_chunk,
            beta=float(rule[0]),
            normalise=bool(rule[1]),
            layers=cfg.num_layers,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            hidden=cfg.hidden_size,
            vocab=cfg.vocab_size,
            **vision,
        )

    @classmethod
    def for_cache(
        cls, model: str, decoder: Decoder, cache: KVCache, vlm: VisionLanguageModel | None = None
    ) -> StepIdentity:
        """:meth:`of` with the slots, chunk and policy of ``cache``."""
        return cls.of(model, decoder, cache.k.shape[2], cache.max_chunk, cache.policy, vlm)

    def fields(self, kind: str = "step") -> dict[str, str]:
        """The settings engine ``kind`` (:data:`KIND_FIELDS`) depends on, as strings (``repr``
        for ``beta``, so it round-trips exactly): its manifest key, compared field by field."""
        names = KIND_FIELDS[kind] or [f.name for f in fields(self)]
        values = asdict(self)
        return {"kind": kind, **{k: repr(values[k]) if isinstance(values[k], float) else str(values[k]) for k in names}}

    def metadata(self, kind: str = "step") -> dict[str, str]:
        """:meth:`fields` under :data:`METADATA_PREFIX`, for an ONNX file's metadata properties."""
        return {METADATA_PREFIX + k: v for k, v in self.fields(kind).items()}

    def stem(self, kind: str = "step") -> str:
        """File name without suffix: ``{model}.{dtype}.slots{S}.chunk{C}.beta{b}.{norm|sum}`` for
        the step, ``{model}.{dtype}.vision.{frame_size}`` and ``{model}.{dtype}.embed``."""
        if kind == "vision":
            return f"{self.model}.{self.dtype}.vision.{self.frame_size}"
        if kind == "embed":
            return f"{self.model}.{self.dtype}.embed"
        return (
            f"{self.model}.{self.dtype}.slots{self.slots}.chunk{self.max_chunk}.beta{self.beta:g}"
            f".{'norm' if self.normalise else 'sum'}"
        )


def example_frame(size: tuple[int, int] | None) -> np.ndarray:
    """A mid-grey uint8 RGB frame of ``size`` ``(width, height)`` (224x224 when None): what a
    vision engine's input shapes are taken from."""
    w, h = size or (224, 224)
    return np.full((h, w, 3), 128, dtype=np.uint8)
