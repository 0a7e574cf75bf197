"""infmllm-bench-backends: per-chunk and per-token time of the torch and onnxruntime backends.

Same machine, same run, same model (SmolLM2-135M fp32) and cache (inf_mllm): a stream of
prefill chunks of ``--chunk`` tokens until the cache has evicted for a while, then
``--decode`` single-token steps. Each backend gets its own cache and the same embeddings.
Reports median milliseconds per chunk and per decoded token, and onnxruntime / torch ratios.

Usage::

    infmllm-bench-backends --json bench/results/backends_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..kvcache import make_policy
from ..models import load_gguf, smollm2_gguf_path
from ..runtime.backends import BACKENDS, make_backend
from .common import machine, markdown_table, write_report


def time_backend(backend, decoder, capacity: int, chunk: int, prefill_chunks: int, decode: int, seed: int = 0) -> dict:
    """Milliseconds per prefill chunk and per decode step of ``backend`` on a fresh cache."""
    cache = decoder.new_cache(capacity, chunk, make_policy("inf_mllm", sinks=4, recent=capacity // 4))
    backend.load_engines(cache)
    g = torch.Generator().manual_seed(seed)
    vocab = decoder.cfg.vocab_size
    chunk_ms, token_ms = [], []
    for _ in range(prefill_chunks):
        embeds = backend.embed(torch.randint(0, vocab, (chunk,), generator=g))
        t0 = time.perf_counter()
        backend.run_chunk(embeds, cache)
        chunk_ms.append((time.perf_counter() - t0) * 1e3)
    for _ in range(decode):
        embeds = backend.embed(torch.randint(0, vocab, (1,), generator=g))
        t0 = time.perf_counter()
        backend.run_chunk(embeds, cache)
        token_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        "chunk_ms": statistics.median(chunk_ms),
        "token_ms": statistics.median(token_ms),
        "evicted_tokens": cache.evicted_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=512, help="KV-cache slots kept (tokens)")
    ap.add_argument("--chunk", type=int, default=64, help="prefill chunk (tokens)")
    ap.add_argument("--prefill-chunks", type=int, default=24, help="chunks streamed (evicts past capacity)")
    ap.add_argument("--decode", type=int, default=64, help="single-token steps after the prefill")
    ap.add_argument("--engine-dir", default="engines", help="where the ONNX step is (exported if absent)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", required=True, help="results file (.json; a .md summary is written beside it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder, _ = load_gguf(smollm2_gguf_path())
    rows, results = [], {"machine": machine(), "config": vars(args), "backends": {}}
    for name in BACKENDS:
        backend = make_backend(name, decoder, args.engine_dir, "smollm2-135m")
        r = time_backend(backend, decoder, args.capacity, args.chunk, args.prefill_chunks, args.decode)
        results["backends"][name] = r
        print(
            f"{name}: {r['chunk_ms']:.1f} ms per {args.chunk}-token chunk, {r['token_ms']:.1f} ms per token", flush=True
        )
    torch_r, ort_r = results["backends"]["torch"], results["backends"]["onnxruntime"]
    results["ratio_onnxruntime_over_torch"] = {
        "chunk": ort_r["chunk_ms"] / torch_r["chunk_ms"],
        "token": ort_r["token_ms"] / torch_r["token_ms"],
    }
    for name, r in results["backends"].items():
        rows.append(
            [
                name,
                r["chunk_ms"],
                r["token_ms"],
                r["chunk_ms"] / torch_r["chunk_ms"],
                r["token_ms"] / torch_r["token_ms"],
            ]
        )
    m = results["machine"]
    md = (
        f"# Backends on {m['cpu']} ({m['cores']} cores), torch {m['torch']}\n\n"
        f"SmolLM2-135M fp32, inf_mllm cache of {args.capacity} slots, {args.prefill_chunks} prefill chunks of "
        f"{args.chunk} tokens then {args.decode} single-token steps; medians.\n\n"
        + markdown_table(["backend", "ms / chunk", "ms / token", "chunk vs torch", "token vs torch"], rows)
        + "\n"
    )
    write_report(args.json, results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
