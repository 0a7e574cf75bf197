"""CUDA kernels of the KV cache (``cuda/*.cu``), loaded at run time with NVRTC.

CuPy ``RawModule`` is the loader; PyCUDA ``SourceModule`` is the alternative where CuPy is
missing (as on some JetPack images). Torch CUDA tensors are passed without copies (CuPy through
``__cuda_array_interface__``, PyCUDA through raw device pointers) on torch's current stream.
Every launch is preceded by :func:`check_compact_args` / :func:`check_select_args`, so a wrong
dtype, a non-contiguous tensor, mismatched shapes or a budget larger than the row is a
ValueError before any memory is touched.

Status: compiled for sm_87 and sm_90 in CI (``test/test_cuda_compile.py``); parity with the
torch reference (``test/test_cuda_parity.py``) runs only where CUDA is present and has not yet
run on a GPU (no GPU was lent to the session that wrote this).
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch

from .rope import Rope

THREADS = 256  # INFMLLM_THREADS in cuda/kvcache_layout.cuh
MAX_HEAD_DIM = 256
SOURCES = ("kv_compact.cu", "saddle_select.cu")


def cuda_dir() -> Path:
    """Folder holding the ``.cu`` sources: the source tree, or ``share/infmllm_ros/cuda`` once installed.

    Raises:
        FileNotFoundError: neither exists.
    """
    for cand in (Path(__file__).resolve().parents[2] / "cuda", Path(sys.prefix) / "share" / "infmllm_ros" / "cuda"):
        if (cand / SOURCES[0]).is_file():
            return cand
    raise FileNotFoundError("CUDA kernel sources (cuda/*.cu) not found")


def check_compact_args(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, metadata: tuple) -> None:
    """Validate :func:`kv_compact` arguments (device-independent).

    Raises:
        ValueError: dtype not fp16/fp32, K/V differ, non-contiguous, head_dim odd or > 256,
            keep not int64 ``[layers, kv_heads, B]`` with ``B <= slots``, metadata of the wrong
            dtype/shape.
    """
    if k.dtype not in (torch.float16, torch.float32) or v.dtype != k.dtype:
        raise ValueError(f"K/V must both be float16 or float32, got {k.dtype} and {v.dtype}")
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must be equal [layers, kv_heads, slots, head_dim]")
    if not (k.is_contiguous() and v.is_contiguous() and keep.is_contiguous()):
        raise ValueError("K, V and keep must be contiguous")
    if k.shape[3] % 2 or k.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and <= {MAX_HEAD_DIM}, got {k.shape[3]}")
    if keep.device != k.device or v.device != k.device:
        raise ValueError(f"K ({k.device}), V ({v.device}) and keep ({keep.device}) must be on one device")
    if keep.dtype != torch.int64 or keep.dim() != 3 or keep.shape[:2] != k.shape[:2]:
        raise ValueError(f"keep must be int64 [{k.shape[0]}, {k.shape[1]}, B], got {keep.dtype} {tuple(keep.shape)}")
    if keep.shape[2] > k.shape[2]:
        raise ValueError(f"keep has {keep.shape[2]} slots per row, more than the buffer's {k.shape[2]}")
    want = (torch.int64, torch.int8, torch.int32, torch.float64, torch.float32)
    for m, dt in zip(metadata, want):
        if m.dtype != dt or m.shape != k.shape[:3] or not m.is_contiguous() or m.device != k.device:
            raise ValueError(f"metadata must be contiguous {dt} {tuple(k.shape[:3])} on {k.device}")


def check_select_args(scores: torch.Tensor, length: int, sinks: int, recent: int, budget: int) -> None:
    """Validate :func:`saddle_select` arguments (device-independent).

    Raises:
        ValueError: scores not contiguous float32 ``[layers, kv_heads, slots]``, ``length`` beyond
            the slots, or counts with ``sinks + recent > budget`` or ``budget >= length``.
    """
    if scores.dtype != torch.float32 or scores.dim() != 3 or not scores.is_contiguous():
        raise ValueError(f"scores must be contiguous float32 [layers, kv_heads, slots], got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    if not 0 < length <= scores.shape[2]:
        raise ValueError(f"length {length} outside 1..{scores.shape[2]} slots")
    if min(sinks, recent) < 0 or sinks + recent > budget:
        raise ValueError(f"sinks ({sinks}) + recent ({recent}) exceed the budget ({budget})")
    if budget >= length:
        raise ValueError(f"budget ({budget}) must be smaller than the row length ({length})")


def kernel_source() -> str:
    """All kernels as one NVRTC translation unit (the layout header inlined once)."""
    folder = cuda_dir()
    include = '#include "kvcache_layout.cuh"'
    header = (folder / "kvcache_layout.cuh").read_text().replace("#pragma once", "")
    return "\n".join([header] + [(folder / name).read_text().replace(include, "") for name in SOURCES])


@functools.lru_cache(maxsize=1)
def _module():
    """The compiled module: ('cupy', RawModule) or ('pycuda', SourceModule).

    Raises:
        RuntimeError: neither CuPy nor PyCUDA is importable.
    """
    code = kernel_source()
    try:
        import cupy

        return "cupy", cupy.RawModule(code=code, options=("--std=c++17",))
    except ImportError:
        pass
    try:
        import pycuda.autoprimaryctx  # noqa: F401  (uses the primary context torch also uses)
        from pycuda.compiler import SourceModule

        return "pycuda", SourceModule(code, no_extern_c=True, options=["--std=c++17"])
    except ImportError as exc:
        raise RuntimeError("CUDA kernels need CuPy (pip install cupy-cuda12x) or PyCUDA") from exc


def _launch(name: str, blocks: int, args: list) -> None:
    kind, mod = _module()
    stream = torch.cuda.current_stream()
    if kind == "cupy":
        import cupy

        fn = mod.get_function(name)
        conv = [cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args]
        with cupy.cuda.ExternalStream(stream.cuda_stream):
            fn((blocks,), (THREADS,), conv)
    else:
        fn = mod.get_function(name)
        conv = [np.uintp(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        fn(*conv, block=(THREADS, 1, 1), grid=(blocks, 1), stream=_PyCudaStream(stream.cuda_stream))


class _PyCudaStream:
    """Minimal stand-in PyCUDA accepts as ``stream=`` (it reads ``.handle``)."""

    def __init__(self, handle: int):
        self.handle = handle


def saddle_select(scores: torch.Tensor, length: int, sinks: int, recent: int, budget: int) -> torch.Tensor:
    """CUDA :func:`reference.saddle_select` over ``scores[..., :length]`` of a slot buffer.

    Args:
        scores: float32 ``[layers, kv_heads, slots]`` on a CUDA device (finite values).
        length, sinks, recent, budget: as in the reference.

    Returns:
        int64 ``[layers, kv_heads, budget]`` ascending kept slots.
    """
    check_select_args(scores, length, sinks, recent, budget)
    rows = scores.shape[0] * scores.shape[1]
    keep = torch.empty(*scores.shape[:2], budget, dtype=torch.int64, device=scores.device)
    _launch("saddle_select_f32", rows, [scores, keep, np.int32(length), np.int32(scores.shape[2]),
                                         np.int32(sinks), np.int32(recent), np.int32(budget)])
    return keep


def kv_compact(k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, rope: Rope | None,
               metadata: tuple[torch.Tensor, ...]) -> None:
    """CUDA :func:`reference.kv_compact`, in place.

    Args:
        k, v: fp16/fp32 ``[layers, kv_heads, slots, head_dim]`` CUDA buffers.
        keep: int64 ``[layers, kv_heads, B]`` ascending kept slots.
        rope: the model's RoPE (None: no re-rotation).
        metadata: ``(position int64, kind int8, frame int32, stamp float64[, scores float32])``,
            each ``[layers, kv_heads, slots]``.
    """
    check_compact_args(k, v, keep, metadata)
    if len(metadata) not in (4, 5):
        raise ValueError("metadata must be (position, kind, frame, stamp[, scores])")
    inv = (rope.inv_freq if rope is not None else torch.zeros(k.shape[3] // 2)).to(k.device, torch.float32)
    scores = metadata[4] if len(metadata) == 5 else np.uintp(0)
    name = "kv_compact_f16" if k.dtype == torch.float16 else "kv_compact_f32"
    _launch(name, k.shape[0] * k.shape[1],
            [k, v, k, v, keep, inv, *metadata[:4], scores, np.int32(keep.shape[2]), np.int32(k.shape[2]),
             np.int32(k.shape[3]), np.int32(rope is not None)])
