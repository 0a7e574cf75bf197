"""infmllm-bench-kernels: the CUDA KV-cache kernels against the torch reference on one GPU.

For each model shape and capacity, one eviction step of a chunk of ``W`` new tokens is timed:
``window_scores`` (with carry), ``saddle_select`` and ``kv_compact`` (in place, re-rotating keys),
each alone and the three together ("step"), as our kernels and as the torch reference
(:mod:`infmllm_ros.kvcache.reference`) on the same GPU, inputs and stream. Times are medians of
CUDA-event intervals after warm-up. ``kv_compact``'s effective bandwidth (bytes it must read and
write / time) is reported against a device-to-device copy measured in the same run, and every
kernel's bytes are divided by Jetson AGX Orin's 204.8 GB/s for a memory-bound Orin estimate (an
estimate only: nothing here ran on a Jetson).

Usage (on a CUDA machine)::

    infmllm-bench-kernels --json bench/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ..kvcache import kernels, reference
from ..kvcache.rope import Rope
from .common import machine, markdown_table, write_report

SHAPES = {  # layers, query heads, kv heads, head_dim
    "smollm2-135m": (30, 9, 3, 64),
    "qwen2-1.5b": (28, 12, 2, 128),
}
ORIN_BYTES_PER_S = 204.8e9  # Jetson AGX Orin 64GB LPDDR5 peak
META_BYTES = 8 + 1 + 4 + 8 + 4  # position int64, kind int8, frame int32, stamp float64, score float32


def cuda_seconds(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of ``fn()`` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_seconds(fn, iters: int = 20) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph: GPU time without the
    Python launch overhead (``fn`` must not synchronise with the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_seconds(graph.replay, iters=iters)


def copy_bytes_per_s(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) for ``nbytes`` buffers."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_seconds(lambda: dst.copy_(src))


def step_bytes(
    layers: int, kv_heads: int, head_dim: int, elem: int, length: int, budget: int, queries: int
) -> dict[str, int]:
    """Bytes each kernel must move at least (reads + writes), per eviction step.

    window: K read twice (two passes) + queries + carried scores read and written.
    select: scores read, kept indices written. compact: kept K and V read and written, kept
    indices read, per-slot metadata read and written.
    """
    rows = layers * kv_heads
    window = 2 * rows * length * head_dim * elem + queries * head_dim * elem * layers + 2 * rows * length * 4
    select = rows * length * 4 + rows * budget * 8
    compact = 2 * 2 * rows * budget * head_dim * elem + rows * budget * (8 + 2 * META_BYTES)
    return {"window_scores": window, "saddle_select": select, "kv_compact": compact, "step": window + select + compact}


def bench_case(
    model: str,
    capacity: int,
    window: int,
    dtype: torch.dtype,
    device: torch.device,
    copy_bw: float,
    beta: float = 1e-2,
    decay: float = 0.9,
) -> dict:
    """Time one eviction step of ``window`` tokens into a full cache of ``capacity`` slots."""
    layers, q_heads, kv_heads, head_dim = SHAPES[model]
    slots = length = capacity + window
    q_start, sinks, recent = capacity, 4, capacity // 4
    scale = head_dim**-0.5
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(layers, q_heads, window, head_dim, generator=g, device=device).to(dtype)
    k = torch.randn(layers, kv_heads, slots, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn_like(k)
    scores = torch.rand(layers, kv_heads, slots, generator=g, device=device)
    meta = (
        torch.arange(slots, device=device).repeat(layers, kv_heads, 1),
        torch.zeros(layers, kv_heads, slots, dtype=torch.int8, device=device),
        torch.zeros(layers, kv_heads, slots, dtype=torch.int32, device=device),
        torch.zeros(layers, kv_heads, slots, dtype=torch.float64, device=device),
        scores,
    )
    rope = Rope(head_dim, 1e5)
    keep = reference.saddle_select(scores, sinks, recent, capacity)

    def ref_window():
        for layer in range(layers):
            fresh = reference.window_scores(q[layer], k[layer], q_start, scale, beta)
            scores[layer] = decay * scores[layer] + fresh

    def ours_window():
        kernels.window_scores(q, k, length, q_start, scale, beta, out=scores, decay=decay)

    ops = {
        "window_scores": (ref_window, ours_window),
        "saddle_select": (
            lambda: reference.saddle_select(scores, sinks, recent, capacity),
            lambda: kernels.saddle_select(scores, length, sinks, recent, capacity),
        ),
        "kv_compact": (
            lambda: reference.kv_compact(k, v, keep, rope, meta),
            lambda: kernels.kv_compact(k, v, keep, rope, meta),
        ),
    }

    def ref_step():
        ref_window()
        reference.kv_compact(k, v, reference.saddle_select(scores, sinks, recent, capacity), rope, meta)

    def ours_step():
        ours_window()
        kernels.kv_compact(k, v, kernels.saddle_select(scores, length, sinks, recent, capacity), rope, meta)

    ops["step"] = (ref_step, ours_step)
    nbytes = step_bytes(layers, kv_heads, head_dim, k.element_size(), length, capacity, q_heads * window)
    out = {
        "model": model,
        "capacity": capacity,
        "window": window,
        "dtype": str(dtype).replace("torch.", ""),
        "layers": layers,
        "q_heads": q_heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
    }
    for name, (ref_fn, our_fn) in ops.items():
        t_ref, t_call, t_gpu = cuda_seconds(ref_fn), cuda_seconds(our_fn), graph_seconds(our_fn)
        out[name] = {
            "torch_ms": t_ref * 1e3,
            "kernel_call_ms": t_call * 1e3,
            "kernel_gpu_ms": t_gpu * 1e3,
            "speedup": t_ref / t_call,
            "bytes": nbytes[name],
            "kernel_gb_s": nbytes[name] / t_gpu / 1e9,
            "orin_estimate_ms": nbytes[name] / ORIN_BYTES_PER_S * 1e3,
        }
    out["kv_compact"]["fraction_of_copy"] = out["kv_compact"]["kernel_gb_s"] * 1e9 / copy_bw
    return out


def report(results: dict) -> str:
    """Markdown summary of a :func:`main` run."""
    m = results["machine"]
    lines = [
        f"# CUDA KV-cache kernels vs the torch reference ({m['gpu']})",
        "",
        f"torch {m['torch']}, {results['loader']}; device-to-device copy "
        f"{results['copy_gb_s']:.0f} GB/s (read + write). One eviction step of W={results['window']} "
        "new tokens into a full cache, fp16 K/V, sinks 4, recent capacity/4, beta 1e-2, decay 0.9. "
        "Times: median of 20 CUDA-event intervals. *torch* and *call* time a Python call of the "
        "torch reference and of our kernels (launch overhead included, as the cache sees it); "
        "*speedup* = torch / call. *GPU* times our kernels replayed from a CUDA graph (no host "
        "overhead); GB/s = bytes the op must move / GPU time. Orin: bytes / 204.8 GB/s, a "
        "memory-bound estimate (no Jetson was used).",
        "",
    ]
    header = ["model", "capacity", "op", "torch ms", "call ms", "speedup", "GPU ms", "GB/s", "Orin est. ms"]
    rows = []
    for r in results["cases"]:
        for op in ("window_scores", "saddle_select", "kv_compact", "step"):
            x = r[op]
            rows.append(
                [
                    r["model"],
                    r["capacity"],
                    op,
                    x["torch_ms"],
                    x["kernel_call_ms"],
                    x["speedup"],
                    x["kernel_gpu_ms"],
                    x["kernel_gb_s"],
                    x["orin_estimate_ms"],
                ]
            )
    lines.append(markdown_table(header, rows))
    lines += ["", "kv_compact effective bandwidth (GPU time) as a fraction of the measured copy:", ""]
    lines.append(
        markdown_table(
            ["model", "capacity", "fraction of copy"],
            [[r["model"], r["capacity"], r["kv_compact"]["fraction_of_copy"]] for r in results["cases"]],
        )
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacities", default="1024,4096,16384", help="comma-separated slot counts")
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--window", type=int, default=64, help="new tokens per eviction step (W)")
    ap.add_argument("--json", required=True, help="results file (.json; a .md summary is written beside it)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("infmllm-bench-kernels needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    models = args.models.split(",")
    unknown = sorted(set(models) - set(SHAPES))
    if unknown:
        ap.error(f"unknown model shape(s) {unknown}; choose from {sorted(SHAPES)}")
    copy_bw = copy_bytes_per_s(256 * 2**20, device)
    results = {
        "machine": machine(),
        "loader": kernels.loader(),
        "copy_gb_s": copy_bw / 1e9,
        "window": args.window,
        "cases": [],
    }
    for model in models:
        for capacity in (int(c) for c in args.capacities.split(",")):
            case = bench_case(model, capacity, args.window, torch.float16, device, copy_bw)
            results["cases"].append(case)
            print(
                f"{model} capacity {capacity}: step {case['step']['kernel_call_ms']:.3f} ms vs torch "
                f"{case['step']['torch_ms']:.3f} ms ({case['step']['speedup']:.1f}x); kv_compact "
                f"{case['kv_compact']['fraction_of_copy']:.0%} of copy",
                flush=True,
            )
    write_report(args.json, results, report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
