"""Inference backends: how a chunk of a stream runs through the language model and its cache.

The session hands every chunk (system prompt, frame, question, generated token) to a backend
and gets the last position's logits back; it does not care which backend runs:

* ``torch``: :class:`~infmllm_ros.models.Decoder` attending through the
  :class:`~infmllm_ros.kvcache.KVCache` layer by layer (the reference).
* ``onnxruntime``: the model's three exported engines (:mod:`infmllm_ros.engines.onnx_export`):
  the vision tower, the embedding lookup and the decoder step, which takes the cache's K/V
  buffers as inputs; the cache stores the chunk's K/V and window scores it returns and evicts as
  usual.
* ``tensorrt``: the same three engines built by TensorRT, on CUDA (Jetson); untested here.
* ``compiled``: the decoder step compiled by ``torch.compile`` (Inductor) for decoded tokens, a
  CUDA graph of it on a GPU (that path untested here: no GPU on these machines; its test skips
  with the reason); chunks of two or more tokens run the ``torch`` path, as do the vision tower
  and the embedding lookup.

:data:`BACKENDS` names them; each is one class, and :meth:`Backend.load_engines` is where one
exports, loads or compiles what it runs (minutes, with a progress line).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engines.decoder_step import rope_positions, step_inputs
from ..engines.identity import StepIdentity
from ..kvcache import KVCache, SlotKind
from ..models import Decoder
from ..models.family import VisionLanguageModel, VisionRunner
from .file_safety import replace_atomically, set_aside


@dataclass(frozen=True)
class ChunkInfo:
    """What a chunk is beside its embeddings: slot metadata ``kind``, ``frame_id``, ``stamp_s``
    (:meth:`KVCache.begin_chunk`), a vision chunk's int64 ``[3, n]`` M-RoPE positions and a
    DeepStack model's ``[layers, n, hidden]`` features (:meth:`Decoder.forward`)."""

    kind: SlotKind | torch.Tensor = SlotKind.TEXT
    frame_id: int = -1
    stamp_s: float = math.nan
    mrope: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None


class Backend:
    """Runs chunks through ``decoder``'s weights and a :class:`KVCache`.

    Args:
        decoder: the model.

    Attributes:
        vision: the vision engine frames run through
            (:meth:`~infmllm_ros.models.family.VisionLanguageModel.encode_frame`'s ``vision``),
            None for the family's torch tower.
    """

    name = "base"
    vision: VisionRunner | None = None

    def __init__(self, decoder: Decoder):
        self.decoder = decoder

    @classmethod
    def open(
        cls,
        decoder: Decoder,
        engine_dir: str | Path,
        model_name: str,
        progress: Callable[[str], None],
        model: VisionLanguageModel | None,
    ) -> Backend:
        """This backend for ``decoder`` with the settings :func:`make_backend` passes every
        backend (each takes the ones it uses; the base takes the decoder alone)."""
        return cls(decoder)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids int64 ``[n]`` -> input embeddings ``[n, hidden]``."""
        return self.decoder.embed(ids)

    def load_engines(self, cache: KVCache) -> None:
        """Make the engines that serve ``cache`` ready: find or export the ONNX engines, load the
        TensorRT engines, compile the decoder step (each a backend's own; minutes when an export
        or a compile runs, with a progress line). Nothing for torch.

        Raises:
            ValueError: this backend cannot serve ``cache`` (each backend names why).
        """

    def run_chunk(
        self,
        embeds: torch.Tensor,
        cache: KVCache,
        kind: SlotKind | torch.Tensor = SlotKind.TEXT,
        frame_id: int = -1,
        stamp_s: float = math.nan,
        logits: bool = True,
        mrope: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Append ``embeds`` ``[n, hidden]`` to the stream; fp32 logits ``[vocab]`` of its last token.

        ``kind``, ``frame_id``, ``stamp_s``: slot metadata (see :meth:`KVCache.begin_chunk`).
        ``mrope``: int64 ``[3, n]`` M-RoPE positions of a vision chunk (:meth:`Decoder.forward`).
        ``deepstack``: a DeepStack model's ``[layers, n, hidden]`` for a frame chunk (:meth:`Decoder.forward`).
        ``logits=False``: the caller does not need them (a frame); a backend may skip the LM head
        (torch does: one ``[vocab, hidden]`` matrix-vector product, the largest of the model) and
        return None.

        Raises:
            ValueError / CacheFullError: as :meth:`KVCache.begin_chunk`; the cache is unchanged.
        """
        return self._run(embeds, cache, ChunkInfo(kind, frame_id, stamp_s, mrope, deepstack), logits)

    def _run(self, embeds: torch.Tensor, cache: KVCache, chunk: ChunkInfo, logits: bool) -> torch.Tensor | None:
        """:meth:`run_chunk`, each backend's own."""
        raise NotImplementedError


class TorchBackend(Backend):
    """The torch decoder attending through the cache (CPU or CUDA)."""

    name = "torch"

    @torch.inference_mode()
    def _run(self, embeds: torch.Tensor, cache: KVCache, chunk: ChunkInfo, logits: bool) -> torch.Tensor | None:
        hidden = self.decoder(embeds, cache, chunk.kind, chunk.frame_id, chunk.stamp_s, chunk.mrope, chunk.deepstack)
        return self.decoder.logits(hidden[-1:])[0] if logits else None


class EngineBackend(Backend):
    """A backend whose step is an engine taking the cache's buffers as inputs (onnxruntime,
    TensorRT): the cache stores the chunk's K/V and window scores it returns, then evicts.

    Subclasses set ``self.step`` in :meth:`load_engines` (and ``self.embedding`` when the
    embedding lookup is an engine too) and name the device the engine's tensors live on
    (``io_device``).
    """

    io_device = "cpu"

    def __init__(self, decoder: Decoder):
        super().__init__(decoder)
        self.step: Callable[..., tuple[torch.Tensor, ...]] | None = None
        self.embedding: Callable[[torch.Tensor], torch.Tensor] | None = None

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return super().embed(ids) if self.embedding is None else self.embedding(ids)

    @torch.inference_mode()
    def _run(self, embeds: torch.Tensor, cache: KVCache, chunk: ChunkInfo, logits: bool) -> torch.Tensor | None:
        mrope, deepstack = chunk.mrope, chunk.deepstack
        if self.step is None:
            raise RuntimeError(f"{type(self).__name__}.load_engines(cache) must run before the first chunk")
        if mrope is not None and self.decoder.cfg.mrope_section is None:
            raise ValueError("3-D (t, h, w) positions given to a 1-D RoPE model")
        cfg, n, dev = self.decoder.cfg, embeds.shape[0], self.io_device
        extra: tuple[torch.Tensor, ...]
        if cfg.deepstack_layers:  # the graph always takes it: zeros for a chunk without vision tokens
            deepstack = embeds.new_zeros(cfg.deepstack_layers, n, cfg.hidden_size) if deepstack is None else deepstack
            extra = (deepstack.to(dev, embeds.dtype),)
        else:
            extra = ()
        slot_positions = cache.begin_chunk(n, chunk.kind, chunk.frame_id, chunk.stamp_s, mrope)
        try:
            last, new_k, new_v, scores = self.step(
                embeds[None].to(dev),
                cache.k.to(dev),
                cache.v.to(dev),
                cache.length,
                rope_positions(slot_positions, mrope).to(dev),
                *extra,
            )
            cache.store_chunk(new_k, new_v, scores)
        except BaseException:
            cache.rollback()
            raise
        cache.commit()
        return last[0].float().to(embeds.device)


class OnnxRuntimeBackend(EngineBackend):
    """A model's engines on onnxruntime (CPU): the decoder step, and with ``model`` its vision
    engine and embedding lookup too, so a frame runs vision, frame chunk, question and decode on
    onnxruntime.

    Each engine is built for one model, frame size, buffer size and scoring rule (its
    :class:`~infmllm_ros.engines.identity.StepIdentity` key); :meth:`load_engines` finds it in
    ``engine_dir`` under the identity's file name (exporting it first when absent: minutes for a
    135M model on 2 cores) and refuses a file whose recorded identity differs.

    Args:
        decoder: the model's decoder (CPU weights).
        engine_dir: folder of exported engines.
        model_name: names the model in the file names (e.g. the GGUF's stem).
        progress: called with a line of text before a long export.
        model: the vision-language model ``decoder`` belongs to (None: the decoder step alone,
            embeddings and frames stay in torch).
    """

    name = "onnxruntime"

    def __init__(
        self,
        decoder: Decoder,
        engine_dir: str | Path,
        model_name: str,
        progress: Callable[[str], None] = print,
        model: VisionLanguageModel | None = None,
    ):
        super().__init__(decoder)
        self.engine_dir, self.model_name, self.progress, self.model = Path(engine_dir), model_name, progress, model

    @classmethod
    def open(cls, decoder, engine_dir, model_name, progress, model) -> Backend:
        return cls(decoder, engine_dir, model_name, progress, model)

    def engine_path(self, identity: StepIdentity, kind: str = "step") -> Path:
        """The file of engine ``kind`` (``step``, ``vision``, ``embed``) for ``identity``."""
        return self.engine_dir / f"{identity.stem(kind)}.onnx"

    def load_engines(self, cache: KVCache) -> None:
        """Find or export each engine for ``cache`` and check it.

        An engine under the identity's file name that onnxruntime cannot load, or that was built
        for another model, checkpoint, frame size, buffer size or scoring, is set aside intact
        with its external data (:func:`.file_safety.set_aside`, reported through ``progress``)
        and exported again; an export is written atomically, so an interrupted one leaves no
        half-written engine.

        Raises:
            ValueError: the cache's policy scores with a rule that has no engine graph, or a
                freshly exported engine does not match (a bug, not a stale file).
            RuntimeError: onnxruntime missing, or cannot load a freshly exported engine.
            NotImplementedError: the model's family has no vision tower to export.
            OSError: ``engine_dir`` cannot be written.
        """
        from ..engines import onnx_export as ox

        try:
            import onnxruntime  # noqa: F401  (checked before minutes of export)
        except ImportError as exc:
            raise RuntimeError("onnxruntime is not installed: pip install onnxruntime, or use backend torch") from exc
        expected = StepIdentity.for_cache(self.model_name, self.decoder, cache, self.model)
        model = self.model
        if model is not None:  # vision first: a family without a tower module is refused before any export
            self.vision = self._engine(
                ox.OrtVision, expected, "vision", lambda tmp, data: ox.export_vision(model, tmp, expected, data)
            )
            self.embedding = self._engine(
                ox.OrtEmbedding,
                expected,
                "embed",
                lambda tmp, data: ox.export_embedding(self.decoder, tmp, expected, data),
            )
        self.step = self._engine(
            ox.OrtDecoderStep,
            expected,
            "step",
            lambda tmp, data: ox.export_decoder_step(self.decoder, tmp, expected, data),
        )

    def _engine(self, runner, expected: StepIdentity, kind: str, export: Callable[[Path, str], object]):
        path = self.engine_path(expected, kind)
        data = path.with_name(f"{path.name}.data")
        if path.exists():
            try:
                engine = runner(path)
                engine.check(expected)
                return engine
            except (RuntimeError, ValueError) as exc:
                reason = "unloadable" if isinstance(exc, RuntimeError) else "other-identity"
                aside = set_aside(path, reason)
                if data.exists():
                    set_aside(data, reason)
                self.progress(f"{exc}; set aside as {aside}")
        self.progress(f"exporting the {kind} engine to {path} (once; minutes on a small CPU) ...")
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: export(tmp, data.name))
        engine = runner(path)
        engine.check(expected)
        return engine


class TensorRTBackend(EngineBackend):
    """A model's TensorRT engines on CUDA, chosen from ``engine_dir``'s manifest: the decoder
    step, and with ``model`` its vision engine and embedding lookup.

    Untested here (no TensorRT on these machines); written against the TensorRT 10 API and
    type-checked with mypy (:mod:`infmllm_ros.engines.tensorrt_engine`).

    Args:
        decoder: the model's decoder (its weights on the cache's CUDA device).
        engine_dir: folder holding ``manifest.json`` and engines from ``infmllm-build-engines``.
        model_name: the manifest's model field.
        model: the vision-language model ``decoder`` belongs to (None: the step alone).
    """

    name = "tensorrt"
    io_device = "cuda"

    def __init__(
        self, decoder: Decoder, engine_dir: str | Path, model_name: str, model: VisionLanguageModel | None = None
    ):
        super().__init__(decoder)
        self.engine_dir, self.model_name, self.model = Path(engine_dir), model_name, model

    @classmethod
    def open(cls, decoder, engine_dir, model_name, progress, model) -> Backend:
        return cls(decoder, engine_dir, model_name, model)

    def load_engines(self, cache: KVCache) -> None:
        """Load the engines built for this model, cache, TensorRT version and GPU.

        Raises:
            RuntimeError: TensorRT missing or an engine unloadable. FileNotFoundError: no
            engines. ValueError: none matches (the differing fields are listed).
        """
        from ..engines import tensorrt_engine as trt_engine

        trt_engine.require_tensorrt()
        import tensorrt

        if not cache.k.is_cuda:
            raise ValueError("the tensorrt backend needs the KV cache on a CUDA device (parameter device: cuda)")
        identity = StepIdentity.for_cache(self.model_name, self.decoder, cache, self.model)
        gpu = torch.cuda.get_device_name(cache.k.device)

        def select(kind: str) -> Path:
            return trt_engine.select_engine(
                self.engine_dir, trt_engine.engine_key(identity, kind, tensorrt.__version__, gpu)
            )

        self.step = trt_engine.TrtDecoderStep(select("step"), step_inputs(self.decoder.cfg))
        if self.model is not None:
            self.embedding = trt_engine.TrtEmbedding(select("embed"))
            self.vision = trt_engine.TrtVision(select("vision"), self.model.engine_frame_size)


#: Guards on the model's modules that the compiled step drops: hook dictionaries, module types and
#: absent attributes, ~300 checks a call for SmolLM2, more time a token than the host's own work.
#: Kept: the identity of every weight tensor (frozen into the graph: another model's step must not
#: run these weights) and every setting the step reads. So a hook registered on the model after
#: compiling does not run in the step.
DROPPED_MODULE_GUARDS = frozenset({"EMPTY_NN_MODULE_HOOKS_DICT", "TYPE_MATCH", "NOT_PRESENT_IN_GENERIC_DICT"})


def _module_guards(entries) -> list[bool]:
    """``torch.compile``'s ``guard_filter_fn``: False for the guards of :data:`DROPPED_MODULE_GUARDS`
    on module attributes."""
    return [
        not (e.orig_guard.source.is_unspecialized_nn_module() and e.guard_type in DROPPED_MODULE_GUARDS)
        for e in entries
    ]


class CompiledBackend(EngineBackend):
    """Decoded tokens through the decoder step compiled by ``torch.compile``; chunks through the
    torch path (:class:`TorchBackend`), so a stream mixes both on one cache.

    Serves M-RoPE models too: a decoded token's ``[3, 1]`` positions are an input of the step.

    A decoded token through the torch path is ~50 operator calls per layer, each a Python call
    and a dispatch; compiled, the work between the matrix products (norms, RoPE, softmax, the
    window scores) is a few generated loops and the step one call. The step has static shapes
    (one token, the cache's whole buffer, :mod:`~infmllm_ros.engines.decoder_step`), so it
    compiles once per cache shape and never recompiles as the stream grows; on CUDA it is
    captured in a CUDA graph (``mode="reduce-overhead"``) over the cache's fixed buffers.
    Compiling takes minutes on a small CPU (:meth:`options`: each product is autotuned), once per
    process and cache shape (Inductor's on-disk cache shortens later starts to seconds);
    :meth:`load_engines` does it, with a progress line. Speed and
    compile time: ``bench/results/README.md``, "Ingest and decode cost".

    Args:
        decoder: the model (fp32 packed, int8, or fp16/bf16 on CUDA).
        progress: called with a line of text before compiling.
    """

    name = "compiled"

    def __init__(self, decoder: Decoder, progress: Callable[[str], None] = print):
        super().__init__(decoder)
        self.progress = progress
        self.eager = TorchBackend(decoder)
        self.compiled_for: StepIdentity | None = None

    @classmethod
    def open(cls, decoder, engine_dir, model_name, progress, model) -> Backend:
        return cls(decoder, progress)

    @staticmethod
    def options(device: torch.device) -> dict:
        """Inductor settings for a step on ``device``. CUDA: a CUDA graph of the step
        (``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets). CPU: the weights frozen as
        constants (``freezing``), the generated code called from C++ (``cpp_wrapper``: no Python
        between the ~120 matrix products of a token), and each matrix product autotuned
        (``max_autotune`` over ``CPP,ATEN``): Inductor times its C++ GEMM template (AVX2/AVX-512
        micro-kernels over a copy of the weight it blocks at compile time; int8 weights
        dequantised in registers) against ATen's kernel (oneDNN, MKL, ``_weight_int8pack_mm``) at
        the product's shape and keeps the faster. A token's matrix-vector products read the
        weights markedly faster through the template; the cost is a longer first compile and the
        blocked copy in memory (figures: ``bench/results/README.md``, "Ingest and decode cost").
        The template's int8 product keeps fp32 where ``_weight_int8pack_mm`` rounds to bf16, so
        int8 logits differ from the torch path's by that rounding. Autotuning's reports are
        silenced (``autotune_num_choices_displayed``)."""
        if device.type == "cuda":
            return {"triton.cudagraphs": True}
        return {
            "freezing": True,
            "cpp_wrapper": True,
            "max_autotune": True,
            "max_autotune_gemm_backends": "CPP,ATEN",
            "autotune_num_choices_displayed": 0,
            "max_autotune_report_choices_stats": False,
        }

    def load_engines(self, cache: KVCache) -> None:
        """Compile the step for ``cache``'s buffer and scoring rule, and run it once.

        Raises:
            ValueError: the cache's policy scores with a rule the step does not compute
                (:meth:`StepIdentity.of`).
            RuntimeError: compiling failed (named, with what it needs).
        """
        from torch._inductor import config as inductor_config

        from ..engines.decoder_step import DecoderStep

        identity = StepIdentity.for_cache("model", self.decoder, cache)
        if identity == self.compiled_for:
            return
        step = DecoderStep(self.decoder, identity.beta, identity.normalise, one_token=True).eval()
        self.decoder.rope.inv_freq_on(cache.k.device)  # filled before tracing: the graph guards on it
        compiled = torch.compile(step, dynamic=False, fullgraph=True, options={"guard_filter_fn": _module_guards})
        options = self.options(cache.k.device)
        if cache.k.is_cuda:  # a CUDA graph copies inputs it does not know to be static: not the KV buffer
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)

        def run(embeds, k, v, length: int, positions: torch.Tensor, *deepstack: torch.Tensor):
            # Inductor reads ``freezing`` from its global config (torch.compile's options do not
            # reach it): set around every call, so that any recompile sees the same settings.
            # The graph guards on its inputs' dispatch keys: ``embeds`` always enters as an
            # inference tensor, whether the caller made it in inference mode or not.
            # On the CPU each layer's K/V enters as its own input: Inductor's GEMM kernel takes no
            # storage offset and would copy a slice of the whole buffer. A CUDA graph needs the
            # buffer itself, marked static.
            layers = (k, v) if k.is_cuda else (k.unbind(0), v.unbind(0))
            with inductor_config.patch(options), torch.inference_mode():
                out = compiled(
                    embeds.clone(),
                    *layers,
                    torch.tensor([length], device=k.device),
                    positions.clone(),
                    *(d.clone() for d in deepstack),
                )
            # a CUDA graph's outputs are overwritten by its next replay
            return tuple(t.clone() for t in out) if k.is_cuda else out

        self.progress(
            f"compiling the decode step for {identity.slots} KV slots (once per process; a few minutes "
            f"on a small CPU, seconds with Inductor's cache warm) ..."
        )
        try:
            dev, cfg = cache.k.device, self.decoder.cfg
            embeds = self.embed(torch.zeros(1, dtype=torch.int64, device=dev))
            deepstack = (embeds.new_zeros(cfg.deepstack_layers, 1, cfg.hidden_size),) if cfg.deepstack_layers else ()
            run(embeds[None], cache.k, cache.v, 0, torch.zeros(3, 1, dtype=torch.int64, device=dev), *deepstack)
        except Exception as exc:  # Inductor's errors: no C++ compiler (CPU) or Triton (CUDA), a failed build
            raise RuntimeError(
                f"torch.compile could not build the decode step ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'}); it needs "
                f"a C++ compiler on the CPU, Triton on CUDA; backend torch runs without"
            ) from exc
        self.step, self.compiled_for, self.io_device = run, identity, cache.k.device

    def _run(self, embeds: torch.Tensor, cache: KVCache, chunk: ChunkInfo, logits: bool) -> torch.Tensor | None:
        if embeds.shape[0] > 1 or chunk.mrope is not None or chunk.deepstack is not None:
            return self.eager._run(embeds, cache, chunk, logits)
        return super()._run(embeds, cache, chunk, logits)


def make_backend(
    name: str,
    decoder: Decoder,
    engine_dir: str | Path = "engines",
    model_name: str = "model",
    progress: Callable[[str], None] = print,
    model: VisionLanguageModel | None = None,
) -> Backend:
    """Backend ``name`` (one of :data:`BACKENDS`) for ``decoder``; an engine backend given
    ``model`` (the VLM ``decoder`` belongs to) runs its vision and embedding engines too.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name in BACKENDS:
        return BACKENDS[name].open(decoder, engine_dir, model_name, progress, model)
    raise ValueError(f"unknown backend {name!r}; choose one of {tuple(BACKENDS)}")


#: Backend name (the ``backend`` parameter) -> class, as :data:`~infmllm_ros.kvcache.POLICIES`
#: and :data:`~infmllm_ros.models.registry.FAMILIES` are for policies and model families.
BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (TorchBackend, OnnxRuntimeBackend, TensorRTBackend, CompiledBackend)
}
