"""CUDA kernels of the KV cache (``cuda/*.cu``), loaded at run time with NVRTC.

CuPy ``RawModule`` is the loader; PyCUDA ``SourceModule`` is the alternative where CuPy is
missing (as on some JetPack images). Torch CUDA tensors are passed without copies (CuPy through
``__cuda_array_interface__``, PyCUDA through raw device pointers) on torch's current stream.
Every launch is preceded by :func:`check_window_args`, :func:`check_select_args` or
:func:`check_compact_args`, so a wrong dtype, a non-contiguous tensor, mismatched shapes or a
budget larger than the row is a ValueError before any memory is touched.

Status: compiled for sm_87 and sm_90 in CI (``test/test_cuda_compile.py``); parity with the
torch reference (``test/test_cuda_parity.py``) runs where CUDA is present; figures from an
H100 are in ``bench/results/kernels_h100.md``. Never run on a Jetson.
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
WINDOW_HEAD_DIMS = (32, 64, 128, 256)  # window_scores: 32 dims per thread, a power-of-two lane group
WINDOW_MAX_QUERIES = 2048  # WS_MAX_QUERIES in cuda/window_scores.cu (query heads per kv head x W)
TC_KEYS, TC_MAX_HEAD_DIM = 128, 128  # window_scores tensor-core path (fp16): keys per block, largest head_dim
COMPACT_ITEMS, COMPACT_VEC_BYTES = 4, 16  # KVC_ITEMS and the 16-byte vectors of cuda/kv_compact.cu
SOURCES = ("window_scores.cu", "saddle_select.cu", "kv_compact.cu")


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
        ValueError: dtype not fp16/fp32, K/V differ, non-contiguous, head_dim not a multiple of
            16 (fp16) / 8 (fp32) or > 256,
            keep not int64 ``[layers, kv_heads, B]`` with ``B <= slots``, metadata of the wrong
            dtype/shape.
    """
    if k.dtype not in (torch.float16, torch.float32) or v.dtype != k.dtype:
        raise ValueError(f"K/V must both be float16 or float32, got {k.dtype} and {v.dtype}")
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"K {tuple(k.shape)} and V {tuple(v.shape)} must be equal [layers, kv_heads, slots, head_dim]")
    if not (k.is_contiguous() and v.is_contiguous() and keep.is_contiguous()):
        raise ValueError("K, V and keep must be contiguous")
    pair = 2 * COMPACT_VEC_BYTES // k.element_size()  # a 16-byte vector from each half of the head
    if k.shape[3] % pair or k.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of {pair} for {k.dtype} and <= {MAX_HEAD_DIM}, got {k.shape[3]}")
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


def check_window_args(q: torch.Tensor, k: torch.Tensor, length: int, q_start: int, out: torch.Tensor | None) -> None:
    """Validate :func:`window_scores` arguments (device-independent).

    Raises:
        ValueError: q/k not both contiguous fp16 or fp32 4-D tensors on one device, layer or
            head_dim mismatch, head_dim not in :data:`WINDOW_HEAD_DIMS`, query heads not a
            multiple of kv heads, more than :data:`WINDOW_MAX_QUERIES` queries per kv head, a
            window not inside ``0..length`` or ``length`` beyond the slots, ``out`` not a
            contiguous float32 ``[layers, kv_heads, slots]`` on the same device.
    """
    if k.dtype not in (torch.float16, torch.float32) or q.dtype != k.dtype:
        raise ValueError(f"q and K must both be float16 or float32, got {q.dtype} and {k.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q must be [layers, q_heads, W, head_dim] and K [layers, kv_heads, slots, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if not (q.is_contiguous() and k.is_contiguous()) or q.device != k.device:
        raise ValueError("q and K must be contiguous and on one device")
    layers, q_heads, window, head_dim = q.shape
    if k.shape[0] != layers or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and K {tuple(k.shape)} differ in layers or head_dim")
    if head_dim not in WINDOW_HEAD_DIMS:
        raise ValueError(f"window_scores kernel supports head_dim {WINDOW_HEAD_DIMS}, got {head_dim}")
    if q_heads % k.shape[1]:
        raise ValueError(f"{q_heads} query heads are not a multiple of {k.shape[1]} kv heads")
    if q_heads // k.shape[1] * window > WINDOW_MAX_QUERIES:
        raise ValueError(
            f"{q_heads // k.shape[1]} query heads per kv head x W={window} exceed {WINDOW_MAX_QUERIES} queries"
        )
    if not (q_start >= 0 and window >= 1 and q_start + window <= length <= k.shape[2]):
        raise ValueError(
            f"window at slots {q_start}..{q_start + window - 1} must lie inside length {length} <= {k.shape[2]} slots"
        )
    if out is not None and (
        out.dtype != torch.float32 or out.shape != k.shape[:3] or not out.is_contiguous() or out.device != k.device
    ):
        raise ValueError(f"out must be contiguous float32 {tuple(k.shape[:3])} on {k.device}")


def check_select_args(scores: torch.Tensor, length: int, sinks: int, recent: int, budget: int) -> None:
    """Validate :func:`saddle_select` arguments (device-independent).

    Raises:
        ValueError: scores not contiguous float32 ``[layers, kv_heads, slots]``, ``length`` beyond
            the slots, or counts with ``sinks + recent > budget`` or ``budget >= length``.
    """
    if scores.dtype != torch.float32 or scores.dim() != 3 or not scores.is_contiguous():
        raise ValueError(
            f"scores must be contiguous float32 [layers, kv_heads, slots], got {scores.dtype} {tuple(scores.shape)}"
        )
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


def loader() -> str:
    """Which loader compiled the kernels: ``"cupy"`` or ``"pycuda"`` (compiles on first call).

    Raises:
        RuntimeError: neither is importable.
    """
    return _module()[0]


@functools.cache
def _function(name: str):
    """The compiled kernel ``name`` (looked up once)."""
    return _module()[1].get_function(name)


@functools.lru_cache(maxsize=8)
def _cupy_stream(handle: int):
    """CuPy's view of torch's stream ``handle`` (made once per stream)."""
    import warnings

    import cupy

    with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream (works in 12-14)
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(handle)


def _launch(name: str, grid: tuple[int, ...], args: list) -> None:
    """Launch kernel ``name`` with ``THREADS`` threads per block on torch's current stream.

    Tensors are passed as raw device pointers (a 64-bit value, what a pointer parameter is), so a
    launch costs no array wrapping on the host.
    """
    fn = _function(name)
    handle = torch.cuda.current_stream().cuda_stream
    conv = [np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
    if _module()[0] == "cupy":
        with _cupy_stream(handle):
            fn(grid, (THREADS,), conv)
    else:
        fn(*conv, block=(THREADS, 1, 1), grid=tuple(grid) + (1,) * (2 - len(grid)), stream=_PyCudaStream(handle))


class _PyCudaStream:
    """Minimal stand-in PyCUDA accepts as ``stream=`` (it reads ``.handle``)."""

    def __init__(self, handle: int):
        self.handle = handle


def window_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    length: int,
    q_start: int,
    scale: float,
    beta: float = 0.0,
    normalise: bool = True,
    out: torch.Tensor | None = None,
    decay: float = 0.0,
) -> torch.Tensor:
    """CUDA :func:`reference.window_scores` for all layers at once, with optional carry.

    fp16 with ``head_dim <= 128`` runs on tensor cores (WMMA, fp32 accumulation); fp32 and
    ``head_dim`` 256 on the SIMT kernels.

    Args:
        q: post-RoPE window queries ``[layers, q_heads, W, head_dim]``, fp16/fp32, on CUDA;
            query ``i`` sits at slot ``q_start + i``.
        k: the KV buffer's keys ``[layers, kv_heads, slots, head_dim]``, q's dtype; slots
            ``0..length-1`` are scored.
        length: occupied slots (tokens), ``q_start + W <= length <= slots``.
        q_start: slot of the first window query.
        scale: logit scale (``head_dim ** -0.5``).
        beta: attention-bias slope per slot, logit units (Inf-MLLM §3.3).
        normalise: divide by the number of window queries that see each slot.
        out: float32 ``[layers, kv_heads, slots]`` to write into (a new zeroed one if None).
        decay: carry: ``out = decay * out + score`` when non-zero, else ``out = score``.

    Returns:
        ``out``: float32 ``[layers, kv_heads, slots]``; slots ``>= length`` untouched.

    Raises:
        ValueError: see :func:`check_window_args`.
    """
    check_window_args(q, k, length, q_start, out)
    layers, q_heads, window, head_dim = q.shape
    kv_heads, slots = k.shape[1], k.shape[2]
    if out is None:
        out = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    rows, queries = layers * kv_heads, q_heads // kv_heads * window
    tensor_cores = k.dtype == torch.float16 and head_dim <= TC_MAX_HEAD_DIM
    tiles = -(-length // (TC_KEYS if tensor_cores else THREADS * 32 // head_dim))
    part = torch.empty(2, rows, queries, tiles, dtype=torch.float32, device=k.device)
    lse = torch.empty(rows, queries, dtype=torch.float32, device=k.device)
    suffix = "tc" if tensor_cores else "f16" if k.dtype == torch.float16 else "f32"
    shape = [
        np.int32(kv_heads),
        np.int32(q_heads),
        np.int32(window),
        np.int32(slots),
        np.int32(head_dim),
        np.int32(length),
        np.int32(q_start),
        np.float32(scale),
        np.float32(beta),
    ]
    _launch(f"window_partial_{suffix}", (rows, tiles), [q, k, part[0], part[1], *shape])
    _launch("window_lse", (rows,), [part[0], part[1], lse, np.int32(queries), np.int32(tiles)])
    _launch(
        f"window_columns_{suffix}",
        (rows, tiles),
        [q, k, lse, out, *shape, np.int32(bool(normalise)), np.float32(decay)],
    )
    return out


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
    _launch(
        "saddle_select_f32",
        (rows,),
        [
            scores,
            keep,
            np.int32(length),
            np.int32(scores.shape[2]),
            np.int32(sinks),
            np.int32(recent),
            np.int32(budget),
        ],
    )
    return keep


def compact_tile_slots(head_dim: int, element_size: int) -> int:
    """Output slots per block of ``kv_compact`` (``compact_tile_slots`` in cuda/kv_compact.cu)."""
    return min(THREADS, COMPACT_ITEMS * THREADS * (COMPACT_VEC_BYTES // element_size) // (head_dim // 2))


def kv_compact(
    k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, rope: Rope | None, metadata: tuple[torch.Tensor, ...]
) -> None:
    """CUDA :func:`reference.kv_compact`, in place.

    Parallel over (row, tile of output slots); in-place safety comes from per-tile "sources read"
    flags (cuda/kv_compact.cu), so only a few int32 per tile of scratch is allocated.

    Args:
        k, v: fp16/fp32 ``[layers, kv_heads, slots, head_dim]`` CUDA buffers.
        keep: int64 ``[layers, kv_heads, B]`` ascending kept slots.
        rope: the model's RoPE (None: no re-rotation).
        metadata: ``(position int64, kind int8, frame int32, stamp float64[, scores float32])``,
            each ``[layers, kv_heads, slots]``.

    Raises:
        ValueError: see :func:`check_compact_args`.
    """
    check_compact_args(k, v, keep, metadata)
    if len(metadata) not in (4, 5):
        raise ValueError("metadata must be (position, kind, frame, stamp[, scores])")
    inv = rope.inv_freq_on(k.device) if rope is not None else np.uint64(0)  # NULL: not read without RoPE
    scores = metadata[4] if len(metadata) == 5 else np.uint64(0)
    kept, slots, head_dim = keep.shape[2], k.shape[2], k.shape[3]
    per_tile = compact_tile_slots(head_dim, k.element_size())
    tiles = -(-kept // per_tile)
    blocks = k.shape[0] * k.shape[1] * tiles
    sync = torch.zeros(blocks + 1, dtype=torch.int32, device=k.device)  # per-tile flags + tile counter
    # keep[b] - b <= slots - kept: the earlier tiles that may read a tile's destination slots.
    wait_tiles = -(-(slots - kept) // per_tile)
    name = "kv_compact_f16" if k.dtype == torch.float16 else "kv_compact_f32"
    _launch(
        name,
        (blocks,),
        [
            k,
            v,
            k,
            v,
            keep,
            inv,
            *metadata[:4],
            scores,
            sync[:blocks],
            sync[blocks:],
            np.int32(kept),
            np.int32(slots),
            np.int32(head_dim),
            np.int32(rope is not None),
            np.int32(tiles),
            np.int32(wait_tiles),
        ],
    )
