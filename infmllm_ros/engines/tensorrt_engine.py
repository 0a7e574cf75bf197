"""TensorRT engines of the decoder step: builder, manifest and runtime (TensorRT 10 Python API).

Written against the TensorRT 10 API (JetPack 6 ships 10.3) and type-checked in CI with mypy
against ``tensorrt-stubs==10.13.0.35.1``. **Never run here**: these machines have no TensorRT,
and the GPU test machines have no TensorRT wheel small enough to carry. On a Jetson,
``infmllm-build-engines`` builds the engines on the device they will run on.

* :func:`build_engine`: ONNX parser, fp16 by default, one optimisation profile over the chunk
  length ``1..max_chunk``, a workspace limit, a timing cache kept beside the engines.
* ``engines/manifest.json``: one entry per engine keyed by its :class:`~.identity.StepIdentity`
  (model, shape, dtype, KV-buffer slots, chunk, window-score rule), TensorRT version and GPU;
  :func:`select_engine` refuses any mismatch with the fields that differ.
* :class:`TrtDecoderStep`: deserialises an engine and runs it with ``execute_async_v3`` on
  torch's current stream, binding device buffers owned by torch (the KV cache's own buffers
  go in without a copy).
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
        raise RuntimeError("TensorRT is not installed: the tensorrt backend needs a Jetson (JetPack 6) or a "
                           "GPU machine with the tensorrt wheel; use backend torch or onnxruntime here") from exc
    if not hasattr(tensorrt, "Builder"):  # a stubs-only namespace package
        raise RuntimeError("TensorRT is not installed (only type stubs are): the tensorrt backend needs a "
                           "Jetson (JetPack 6) or a GPU machine with the tensorrt wheel")


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, hidden: int, max_chunk: int,
                 fp16: bool = True, workspace_bytes: int = 2 << 30, timing_cache: str | Path | None = None) -> Path:
    """Build a serialized TensorRT engine from an exported decoder step.

    Args:
        onnx_path: ``.onnx`` from :func:`~.onnx_export.export_decoder_step`.
        engine_path: where the ``.engine`` goes.
        hidden: model hidden size (the ``embeds`` profile is ``[1, 1..max_chunk, hidden]``).
        max_chunk: largest chunk (tokens) the profile admits; optimised for ``max_chunk``.
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
    profile = builder.create_optimization_profile()
    profile.set_shape("embeds", trt.Dims([1, 1, hidden]), trt.Dims([1, max_chunk, hidden]),
                      trt.Dims([1, max_chunk, hidden]))
    config.add_optimization_profile(profile)
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


def engine_key(identity: StepIdentity, tensorrt: str, gpu: str) -> dict[str, str]:
    """The manifest fields an engine is selected by (all strings, compared exactly): the step's
    identity, the TensorRT version and the GPU's name (an engine runs only where it was built)."""
    return {**identity.fields(), "tensorrt": tensorrt, "gpu": gpu}


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
    diff = "; ".join(f"{k}: engine {closest.get(k, 'missing')}, wanted {v}" for k, v in wanted.items()
                     if closest.get(k) != v)
    raise ValueError(f"no engine in {engine_dir} matches this model and cache ({diff}); "
                     "rebuild with infmllm-build-engines")


TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


class TrtDecoderStep:
    """A deserialised decoder-step engine, called like :class:`~.decoder_step.DecoderStep`.

    Args:
        engine_path: ``.engine`` file built on this GPU with this TensorRT version.

    Raises:
        RuntimeError: TensorRT missing, an unreadable or incompatible engine, or IO tensors that
            are not the decoder step's.
        FileNotFoundError: no file at ``engine_path``.
    """

    def __init__(self, engine_path: str | Path):
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
        if sorted(names) != sorted(INPUTS + OUTPUTS):
            raise RuntimeError(f"{path} is not a decoder step engine: tensors {names}")
        self.context = self.engine.create_execution_context()
        self.dtypes = {n: TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    def __call__(self, embeds: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 length: int) -> tuple[torch.Tensor, ...]:
        """Run one chunk on torch's current CUDA stream; CUDA tensors in (no copies), out.

        Raises:
            ValueError: inputs of the wrong dtype or not on CUDA.
            RuntimeError: TensorRT rejects the shapes (e.g. a chunk beyond the profile) or fails.
        """
        feeds = {"embeds": embeds, "k_cache": k_cache, "v_cache": v_cache,
                 "length": torch.tensor([length], dtype=torch.int64, device=k_cache.device)}
        for name, t in feeds.items():
            if not t.is_cuda or t.dtype != self.dtypes[name] or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous CUDA {self.dtypes[name]} tensor, "
                                 f"got {t.dtype} on {t.device}")
        if not self.context.set_input_shape("embeds", tuple(embeds.shape)):
            raise RuntimeError(f"TensorRT rejects a chunk of shape {tuple(embeds.shape)} (outside the profile)")
        outputs = {n: torch.empty(self.context.get_tensor_shape(n)[:], dtype=self.dtypes[n], device=k_cache.device)
                   for n in OUTPUTS}  # Dims[:] is a tuple
        for name, t in {**feeds, **outputs}.items():
            self.context.set_tensor_address(name, t.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return tuple(outputs[n] for n in OUTPUTS)
