"""TensorRT engines of a model's three graphs (decoder step, vision, embedding): builder,
manifest and runtime (TensorRT 10 Python API).

Written against the TensorRT 10 API (JetPack 6 ships 10.3) and type-checked in CI with mypy
against ``tensorrt-stubs==10.13.0.35.1``. **Never run here**: these machines have no TensorRT,
and the GPU test machines have no TensorRT wheel small enough to carry. On a Jetson,
``infmllm-build-engines --backend tensorrt`` builds the engines on the device they will run on.

* :func:`build_engine`: ONNX parser (the files of :mod:`.onnx_export`), fp16 by default, one
  optimisation profile over each dynamic input (the step's chunk length ``1..max_chunk``), a
  workspace limit, a timing cache kept beside the engines. Weight-only INT8/INT4 needs a
  quantised (Q/DQ) ONNX graph, which the exporter does not write yet: not offered.
* ``engines/manifest.json``: one entry per engine keyed by its kind and
  :class:`~.identity.StepIdentity` fields (model, family, checkpoint, frame size, shape, dtype,
  KV-buffer slots, chunk, window-score rule), TensorRT version and GPU; :func:`select_engine`
  refuses any mismatch with the fields that differ.
* :class:`TrtEngine`: deserialises an engine and runs it with ``execute_async_v3`` on torch's
  current stream, binding device buffers owned by torch (the KV cache's own buffers go in
  without a copy); :class:`TrtDecoderStep`, :class:`TrtVision`, :class:`TrtEmbedding` call it
  as their onnxruntime twins are called.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .decoder_step import INPUTS, OUTPUTS
from .identity import StepIdentity

MANIFEST = "manifest.json"


def require_tensorrt() -> None:
    """Check that TensorRT can be imported (functions then ``import tensorrt`` themselves, so
    mypy sees the typed module).

    Raises:
        RuntimeError: TensorRT is not installed (``tensorrt-stubs`` alone provides no runtime).
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: the tensorrt backend needs a Jetson (JetPack 6) or a "
            "GPU machine with the tensorrt wheel; use backend torch or onnxruntime here"
        ) from exc
    if not hasattr(tensorrt, "Builder"):  # a stubs-only namespace package
        raise RuntimeError(
            "TensorRT is not installed (only type stubs are): the tensorrt backend needs a "
            "Jetson (JetPack 6) or a GPU machine with the tensorrt wheel"
        )


#: Per dynamic input of a graph, its (min, opt, max) shapes.
Profile = dict[str, tuple[tuple[int, ...], ...]]


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    profile: Profile | None = None,
    fp16: bool = True,
    workspace_bytes: int = 2 << 30,
    timing_cache: str | Path | None = None,
) -> Path:
    """Build a serialized TensorRT engine from an exported graph.

    Args:
        onnx_path: ``.onnx`` from :mod:`.onnx_export`.
        engine_path: where the ``.engine`` goes.
        profile: per dynamic input, its (min, opt, max) shapes (:func:`step_profile`,
            :func:`embed_profile`); None for a static graph (a vision engine).
        fp16: allow fp16 kernels (BuilderFlag.FP16).
        workspace_bytes: builder workspace pool limit (bytes).
        timing_cache: file to read and update the builder's timing cache (None: no cache).

    Returns:
        ``engine_path``.

    Raises:
        RuntimeError: TensorRT missing, an ONNX file the parser rejects (its errors listed), or
            a failed build.
    """
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if profile:
        opt = builder.create_optimization_profile()
        for name, (low, best, high) in profile.items():
            opt.set_shape(name, trt.Dims(list(low)), trt.Dims(list(best)), trt.Dims(list(high)))
        config.add_optimization_profile(opt)
    cache_file = Path(timing_cache) if timing_cache else None
    if cache_file is not None:
        cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(memoryview(serialized))
    if cache_file is not None:
        cache_file.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return engine_path


def step_profile(hidden: int, max_chunk: int, deepstack_layers: int = 0) -> Profile:
    """The decoder step's profile: ``embeds`` ``[1, 1..max_chunk, hidden]``, ``positions``
    ``[3, 1..max_chunk]`` (and a DeepStack model's ``deepstack`` ``[layers, 1..max_chunk,
    hidden]``), optimised for ``max_chunk``."""
    profile: Profile = {
        "embeds": ((1, 1, hidden), (1, max_chunk, hidden), (1, max_chunk, hidden)),
        "positions": ((3, 1), (3, max_chunk), (3, max_chunk)),
    }
    if deepstack_layers:
        k = deepstack_layers
        profile["deepstack"] = ((k, 1, hidden), (k, max_chunk, hidden), (k, max_chunk, hidden))
    return profile


def embed_profile(max_ids: int) -> Profile:
    """The embedding lookup's profile: ``ids`` ``[1..max_ids]``."""
    return {"ids": ((1,), (max_ids,), (max_ids,))}


def engine_key(identity: StepIdentity, kind: str, tensorrt: str, gpu: str) -> dict[str, str]:
    """The manifest fields engine ``kind`` (``step``, ``vision``, ``embed``) is selected by (all
    strings, compared exactly): its identity fields, the TensorRT version and the GPU's name (an
    engine runs only where it was built)."""
    return {**identity.fields(kind), "tensorrt": tensorrt, "gpu": gpu}


def read_manifest(engine_dir: str | Path) -> list[dict[str, str]]:
    """Entries of ``engine_dir/manifest.json`` (``[]`` when the file does not exist).

    Raises:
        ValueError: the manifest is not valid JSON of the expected shape (the path is named).
    """
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["engines"]
        if not all(isinstance(e, dict) and "file" in e for e in entries):
            raise TypeError("entries need a 'file'")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"corrupt engine manifest {path}: {exc}") from exc
    return entries


def add_to_manifest(engine_dir: str | Path, key: dict[str, str], engine_file: str) -> None:
    """Record ``engine_file`` (relative to ``engine_dir``) under ``key``, replacing an equal key."""
    entries = [e for e in read_manifest(engine_dir) if any(e.get(k) != v for k, v in key.items())]
    entries.append({**key, "file": engine_file})
    (Path(engine_dir) / MANIFEST).write_text(json.dumps({"engines": entries}, indent=1) + "\n")


def select_engine(engine_dir: str | Path, wanted: dict[str, str]) -> Path:
    """The engine file whose manifest key equals ``wanted``.

    Raises:
        FileNotFoundError: no manifest / no engines, or the entry's file is missing.
        ValueError: engines exist but none matches; the message gives, for the closest entry,
            every field that differs (e.g. built for another capacity or TensorRT version).
    """
    entries = read_manifest(engine_dir)
    if not entries:
        raise FileNotFoundError(f"no TensorRT engines in {engine_dir} (run infmllm-build-engines on this device)")
    for e in entries:
        if all(e.get(k) == v for k, v in wanted.items()):
            path = Path(engine_dir) / e["file"]
            if not path.is_file():
                raise FileNotFoundError(f"engine {path} is in the manifest but missing")
            return path
    closest = min(entries, key=lambda e: sum(e.get(k) != v for k, v in wanted.items()))
    diff = "; ".join(
        f"{k}: engine {closest.get(k, 'missing')}, wanted {v}" for k, v in wanted.items() if closest.get(k) != v
    )
    raise ValueError(
        f"no engine in {engine_dir} matches this model and cache ({diff}); rebuild with infmllm-build-engines"
    )


TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TrtEngine:
    """A deserialised engine, run on torch's current CUDA stream.

    Args:
        engine_path: ``.engine`` file built on this GPU with this TensorRT version.
        inputs: the input names it must have, in call order (None: any).

    Raises:
        RuntimeError: TensorRT missing, an unreadable or incompatible engine, or inputs that are
            not ``inputs``.
        FileNotFoundError: no file at ``engine_path``.
    """

    def __init__(self, engine_path: str | Path, inputs: tuple[str, ...] | None = None):
        require_tensorrt()
        import tensorrt as trt

        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {path}")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT cannot deserialize {path} (corrupt, or built for another GPU / version)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if inputs is not None and sorted(self.inputs) != sorted(inputs):
            raise RuntimeError(f"{path} is not the engine expected: inputs {self.inputs}, wanted {list(inputs)}")
        self.inputs = list(inputs) if inputs is not None else self.inputs
        self.context = self.engine.create_execution_context()
        self.dtypes = {n: TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def run(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs for ``tensors`` (inputs in call order); CUDA tensors in (no copies), out.

        Raises:
            ValueError: inputs of the wrong dtype, not contiguous or not on CUDA.
            RuntimeError: TensorRT rejects the shapes (e.g. a chunk beyond the profile) or fails.
        """
        feeds = dict(zip(self.inputs, tensors))
        for name, t in feeds.items():
            if not t.is_cuda or t.dtype != self.dtypes[name] or not t.is_contiguous():
                raise ValueError(
                    f"{name} must be a contiguous CUDA {self.dtypes[name]} tensor, got {t.dtype} on {t.device}"
                )
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT rejects {name} of shape {tuple(t.shape)} (outside the profile)")
        device = tensors[0].device
        outputs = {
            n: torch.empty(self.context.get_tensor_shape(n)[:], dtype=self.dtypes[n], device=device)
            for n in self.outputs
        }  # Dims[:] is a tuple
        for name, t in {**feeds, **outputs}.items():
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return tuple(outputs[n] for n in self.outputs)


class TrtDecoderStep(TrtEngine):
    """A decoder-step engine, called like :class:`~.decoder_step.DecoderStep` (``length`` an int)."""

    def __init__(self, engine_path: str | Path, inputs: tuple[str, ...] = INPUTS):
        super().__init__(engine_path, inputs)
        if sorted(self.outputs) != sorted(OUTPUTS):
            raise RuntimeError(f"{engine_path} is not a decoder step engine: outputs {self.outputs}")
        self.outputs = list(OUTPUTS)

    def __call__(
        self,
        embeds: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        length: int,
        positions: torch.Tensor,
        *deepstack: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        return self.run(
            embeds,
            k_cache,
            v_cache,
            torch.tensor([length], dtype=torch.int64, device=k_cache.device),
            positions,
            *deepstack,
        )


class TrtVision(TrtEngine):
    """A vision engine (the family's ``VisionRunner``): pixel tensors in, the tower's outputs out.

    Args:
        engine_path: the engine. frame_size: ``(width, height)`` px frames are resized to first,
            None when the family's processor fixes the pixel shape.
    """

    def __init__(self, engine_path: str | Path, frame_size: tuple[int, int] | None):
        super().__init__(engine_path)
        self.inputs, self.outputs = sorted(self.inputs), sorted(self.outputs)  # pixels0.., vision0..
        self.frame_size = frame_size

    def __call__(self, *pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(*(p.cuda().contiguous() for p in pixels))


class TrtEmbedding(TrtEngine):
    """The embedding-lookup engine: ids int64 ``[n]`` -> ``[n, hidden]``."""

    def __init__(self, engine_path: str | Path):
        super().__init__(engine_path, ("ids",))

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(ids.cuda().contiguous())[0]
