"""``infmllm-bench-ppl``: streaming perplexity of KV-cache policies on a real LM and real text.

Streams a text file through the model in chunks, with a fixed-size KV cache per policy and
capacity, and reports perplexity overall and per stream-position bucket, per-chunk time
(flatness once the cache is full), and the per-chunk time of Hugging Face transformers with a
growing full cache at 2K/4K/8K context in the same run. Writes JSON, a markdown table and a
PNG plot of log-PPL vs stream position.

Each (policy, capacity, beta) run is an independent job; ``--jobs N`` runs N at once, each
on ``cores / N`` threads. Finished runs are saved as they complete and ``--resume`` skips
runs already in the JSON, so a long sweep can be stopped and continued.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from ..kvcache import make_policy
from ..kvcache.policies import DEFAULT_BETA, DEFAULT_DECAY, POLICIES
from ..models import Decoder, load_gguf, smollm2_gguf_path
from ..models.cpu_gemm import quantize_linears
from .common import check_device, describe, machine, markdown_table, png_figure, synchronizer, write_json


def read_text(path: str | Path) -> str:
    """UTF-8 text of ``path``.

    Raises:
        FileNotFoundError: missing file. ValueError: not UTF-8, or empty / whitespace only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def stream_nll(
    decoder: Decoder, ids: torch.Tensor, cache, chunk: int, progress: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of every token after the first, streaming ``ids`` in chunks.

    Args:
        decoder: the LM. ids: int64 ``[N]`` on the decoder's device. cache: a fresh KVCache.
        chunk: tokens per chunk.
        progress: label for progress lines on stderr (None: silent).

    Returns:
        ``(nll, chunk_seconds)``: float64 ``[N - 1]`` nats for tokens ``1..N-1`` and float64
        ``[chunks]`` wall time per chunk (forward + eviction + logits).
    """
    n = ids.numel()
    nll = np.zeros(n - 1)
    times = []
    starts = range(0, n - 1, chunk)
    step = max(1, len(starts) // 10)
    for c, s in enumerate(starts):
        e = min(s + chunk, n - 1)
        t0 = time.perf_counter()
        logits = decoder.logits(decoder(decoder.embed(ids[s:e]), cache))
        lp = torch.log_softmax(logits, dim=-1)
        nll[s:e] = -lp.gather(1, ids[s + 1 : e + 1, None])[:, 0].double().cpu().numpy()  # waits for a GPU
        times.append(time.perf_counter() - t0)
        if progress and (c + 1) % step == 0:
            ppl = math.exp(nll[:e].mean())
            print(
                f"[{progress}] {e}/{n - 1} tokens, ppl so far {ppl:.2f}, {np.mean(times[-step:]) * 1e3:.0f} ms/chunk",
                file=sys.stderr,
                flush=True,
            )
    return nll, np.asarray(times)


def summarise(nll: np.ndarray, times: np.ndarray, capacity: int, chunk: int, buckets: int) -> dict:
    """PPL overall / per position bucket, decile stability and per-chunk time flatness."""
    edges = np.linspace(0, nll.size, buckets + 1).astype(int)
    bucket_ppl = [float(math.exp(nll[a:b].mean())) for a, b in zip(edges[:-1], edges[1:])]
    full_from = int(math.ceil(capacity / chunk))  # first chunk that finds the cache full
    steady = times[full_from:]
    tenth = max(1, steady.size // 10)
    first, last = steady[:tenth], steady[-tenth:]
    return {
        "ppl": float(math.exp(nll.mean())),
        "bucket_edges": edges.tolist(),
        "bucket_ppl": bucket_ppl,
        "last_over_second_decile": bucket_ppl[-1] / bucket_ppl[1] if buckets >= 2 else None,
        "chunk_ms_median": float(np.median(times) * 1e3),
        "chunk_ms_first10pct_full": float(first.mean() * 1e3) if first.size else None,
        "chunk_ms_last10pct_full": float(last.mean() * 1e3) if last.size else None,
        "chunk_time_ratio_last_first": float(last.mean() / first.mean()) if first.size else None,
    }


_WORKER: dict = {}


def _init_worker(model_path: str, threads: int, device: str, precision: str = "fp32") -> None:
    torch.set_num_threads(threads)
    _WORKER["decoder"] = load_gguf(model_path)[0].to(device)
    if precision == "int8":
        quantize_linears(_WORKER["decoder"])


def _run_job(job: dict, ids: torch.Tensor, chunk: int, buckets: int) -> dict:
    decoder = _WORKER["decoder"]
    policy = make_policy(job["policy"], sinks=job["sinks"], recent=job["recent"], beta=job["beta"], decay=job["decay"])
    cache = decoder.new_cache(job["capacity"], chunk, policy, slack=job.get("slack", 0))
    t0 = time.perf_counter()
    nll, times = stream_nll(decoder, ids.to(cache.k.device), cache, chunk, progress=job["key"])
    out = dict(job)
    out.update(summarise(nll, times, job["capacity"], chunk, buckets))
    out.update(
        {
            "seconds": time.perf_counter() - t0,
            "kv_bytes": cache.nbytes,
            "evicted_tokens_per_row": cache.evicted_tokens,
            "threads": torch.get_num_threads(),
        }
    )
    return out


def _run_all(jobs: list[dict], ids: torch.Tensor, args, model_path: Path, threads: int):
    """Yield finished runs: in this process for ``--jobs 1``, else in a spawned process pool
    (fork after torch has started its thread pool can deadlock the children)."""
    if args.jobs <= 1:
        _init_worker(str(model_path), threads, args.device, args.precision)
        for job in jobs:
            yield _run_job(job, ids, args.chunk, args.buckets)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=args.jobs,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(str(model_path), threads, args.device, args.precision),
    ) as pool:
        futures = [pool.submit(_run_job, j, ids, args.chunk, args.buckets) for j in jobs]
        for fut in as_completed(futures):
            yield fut.result()


def hf_full_cache_chunk_ms(
    model_path: Path, ids: torch.Tensor, contexts: list[int], chunk: int, repeats: int = 3, device: str = "cpu"
) -> dict:
    """Per-chunk time (ms) of transformers' LlamaForCausalLM with a growing full DynamicCache.

    The cache is prefilled to each context length in 512-token pieces, then a ``chunk``-token
    forward is timed ``repeats`` times (cropping back after each). This is the cost a
    full-cache runtime pays per chunk at that context; ours stays at its capacity's cost.
    On a GPU each timed forward ends with a device synchronisation.
    """
    from transformers import DynamicCache, LlamaForCausalLM

    model = (
        LlamaForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
        .eval()
        .to(device)
    )
    ids = ids.to(device)
    sync = synchronizer(ids.device)
    cache = DynamicCache()
    done, out = 0, {}
    with torch.inference_mode():
        for ctx in sorted(contexts):
            while done < ctx:
                step = min(512, ctx - done)
                model(ids[None, done : done + step], past_key_values=cache, use_cache=True)
                done += step
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(ids[None, ctx : ctx + chunk], past_key_values=cache, use_cache=True)
                sync()
                samples.append(time.perf_counter() - t0)
                cache.crop(-chunk)
            out[str(ctx)] = float(np.median(samples) * 1e3)
            print(f"[transformers full cache] context {ctx}: {out[str(ctx)]:.0f} ms/chunk", file=sys.stderr, flush=True)
    return out


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-bench-ppl", description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="UTF-8 text file to stream")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens to stream (default 50000)")
    p.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many tokens of the text first (tells the text's difficulty from "
        "the stream's age: stream the second half fresh)",
    )
    p.add_argument(
        "--capacity", type=_csv(int), default=[128, 256, 512, 1024], help="comma list of KV capacities in tokens"
    )
    p.add_argument(
        "--policy",
        type=_csv(str),
        default=["window", "streaming_llm", "h2o", "inf_mllm"],
        help=f"comma list of policies from {sorted(POLICIES)}",
    )
    p.add_argument("--chunk", type=int, default=32, help="tokens per chunk (default 32)")
    p.add_argument("--sinks", type=int, default=4, help="protected leading tokens (default 4)")
    p.add_argument("--recent", type=int, default=None, help="protected recent tokens (default: capacity/4)")
    p.add_argument(
        "--beta",
        type=_csv(float),
        default=[DEFAULT_BETA],
        help="comma list of inf_mllm attention-bias slopes (logit per slot)",
    )
    p.add_argument(
        "--decay",
        type=_csv(float),
        default=[DEFAULT_DECAY],
        help="comma list of inf_mllm score-carry decays (0 = retrieval window only)",
    )
    p.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct wheel)")
    p.add_argument(
        "--slack",
        type=_csv(int),
        default=[0],
        help="comma list of lazy-eviction slacks (tokens past the capacity before an eviction)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="linear layers: fp32, or weight-only int8 (CPU; models/cpu_gemm.py)",
    )
    p.add_argument("--buckets", type=int, default=10, help="stream-position buckets (default 10)")
    p.add_argument(
        "--hf-contexts",
        type=_csv(int),
        default=[2048, 4096, 8160],
        help="contexts for the transformers full-cache timing ('' to skip)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of model and KV cache (default cpu; "
        "cuda uses the project's CUDA kernels for scoring and compaction)",
    )
    p.add_argument(
        "--order",
        choices=["capacity", "policy"],
        default="capacity",
        help="job order (policy: all capacities of one policy before the next)",
    )
    p.add_argument("--json", required=True, help="output JSON (markdown and PNG written beside it)")
    p.add_argument("--resume", action="store_true", help="keep finished runs found in --json")
    return p.parse_args(argv)


def plan_jobs(args) -> list[dict]:
    """One job per (policy, capacity[, beta, decay]); validates every combination first.

    Raises:
        ValueError: unknown policy, or a capacity below sinks + recent + chunk.
    """
    jobs = []
    for cap in args.capacity:
        recent = args.recent if args.recent is not None else cap // 4
        for name in args.policy:
            variants = [(b, d) for b in args.beta for d in args.decay] if name == "inf_mllm" else [(0.0, 0.0)]
            for (beta, decay), slack in itertools.product(variants, args.slack):
                make_policy(name, sinks=args.sinks, recent=recent, beta=beta, decay=decay).check_capacity(
                    cap, args.chunk
                )
                key = (
                    f"{name}@{cap}"
                    + (f",beta={beta:g},decay={decay:g}" if name == "inf_mllm" else "")
                    + (f",slack={slack}" if slack else "")
                )
                jobs.append(
                    {
                        "key": key,
                        "policy": name,
                        "capacity": cap,
                        "sinks": args.sinks,
                        "recent": recent,
                        "beta": beta,
                        "decay": decay,
                        "slack": slack,
                    }
                )
    return jobs


def _label(run: dict) -> str:
    slack = f" slack={run['slack']}" if run.get("slack") else ""
    if run["policy"] != "inf_mllm":
        return run["policy"] + slack
    return f"inf_mllm beta={run['beta']:g} decay={run['decay']:g}" + slack


def report(data: dict, out: Path) -> None:
    """Write the markdown table and the log-PPL plot beside ``out`` (the JSON path)."""
    runs = sorted(data["runs"].values(), key=lambda r: (r["capacity"], r["key"]))
    rows = [
        [
            r["capacity"],
            _label(r),
            r["ppl"],
            r["bucket_ppl"][1],
            r["bucket_ppl"][-1],
            r["last_over_second_decile"],
            r["chunk_ms_median"],
            r["chunk_time_ratio_last_first"],
        ]
        for r in runs
    ]
    offset = data["config"].get("offset", 0)
    md = [
        f"# Streaming perplexity ({data['config']['tokens']} tokens of {Path(data['config']['text']).name}"
        + (f" from token {offset}" if offset else "")
        + ", "
        f"chunk {data['config']['chunk']}, sinks {data['config']['sinks']})",
        "",
        describe(data["machine"]),
        "",
        markdown_table(
            [
                "capacity",
                "policy",
                "PPL",
                "PPL decile 2",
                "PPL decile 10",
                "d10/d2",
                "ms/chunk (median)",
                "ms/chunk last10%/first10%",
            ],
            rows,
        ),
    ]
    hf = data.get("hf_full_cache_chunk_ms")
    if hf:
        md += [
            "",
            "transformers full cache, ms per chunk at context (same machine, same run): "
            + ", ".join(f"{k}: {v:.0f}" for k, v in hf.items()),
        ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")

    caps = sorted({r["capacity"] for r in runs})
    with png_figure(
        out.with_suffix(".png"), ncols=len(caps), figsize=(4.5 * len(caps), 3.6), squeeze=False, sharey=True
    ) as (_, axes):
        for ax, cap in zip(axes[0], caps):
            for r in (r for r in runs if r["capacity"] == cap):
                edges = np.asarray(r["bucket_edges"])
                mids = (edges[:-1] + edges[1:]) / 2
                ax.plot(mids, np.log(r["bucket_ppl"]), marker="o", ms=3, label=_label(r))
            ax.set_title(f"capacity {cap}")
            ax.set_xlabel("stream position (tokens)")
        axes[0][0].set_ylabel("log PPL")
        axes[0][-1].legend(fontsize=7)


def main(argv=None) -> int:
    """Console entry point; returns the process exit code (2 on bad input)."""
    args = parse_args(argv)
    try:
        model_path = Path(args.model) if args.model else smollm2_gguf_path()
        if not model_path.is_file():
            raise FileNotFoundError(f"model file not found: {model_path}")
        text = read_text(args.text)
        check_device(args.device)
        jobs = plan_jobs(args)
        if args.chunk < 1 or args.tokens < 2 * args.chunk:
            raise ValueError(f"need chunk >= 1 and tokens >= 2 * chunk (got {args.chunk}, {args.tokens})")
        if args.offset < 0:
            raise ValueError(f"offset must be >= 0 tokens, got {args.offset}")
        _, tokenizer = load_gguf(model_path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"infmllm-bench-ppl: error: {exc}", file=sys.stderr)
        return 2
    ids = torch.tensor(tokenizer.encode(text)[args.offset : args.offset + args.tokens], dtype=torch.int64)
    if ids.numel() < 2 * args.chunk:
        print(
            f"infmllm-bench-ppl: error: text has fewer than {2 * args.chunk} tokens after offset {args.offset}",
            file=sys.stderr,
        )
        return 2
    if ids.numel() < args.tokens:
        print(f"infmllm-bench-ppl: note: text has only {ids.numel()} tokens", file=sys.stderr)
    out = Path(args.json)
    data = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "resume")},
        "model": model_path.name,
        "runs": {},
    }
    data["config"]["tokens"] = int(ids.numel())
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        data["runs"] = old.get("runs", {})
        if "hf_full_cache_chunk_ms" in old:
            data["hf_full_cache_chunk_ms"] = old["hf_full_cache_chunk_ms"]
    todo = [j for j in jobs if j["key"] not in data["runs"]]
    if args.order == "policy":
        todo.sort(key=lambda j: args.policy.index(j["policy"]))
    threads = max(1, torch.get_num_threads() // max(1, args.jobs))
    print(
        f"infmllm-bench-ppl: {len(todo)} runs of {ids.numel()} tokens, {args.jobs} at a time "
        f"on {threads} thread(s) each",
        file=sys.stderr,
    )
    for r in _run_all(todo, ids, args, model_path, threads):
        data["runs"][r["key"]] = r
        write_json(out, data)
        report(data, out)
        print(
            f"done {r['key']}: ppl {r['ppl']:.2f}, d10/d2 {r['last_over_second_decile']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    if args.hf_contexts and "hf_full_cache_chunk_ms" not in data:
        torch.set_num_threads(threads)
        contexts = [c for c in args.hf_contexts if c + args.chunk <= ids.numel()]
        data["hf_full_cache_chunk_ms"] = hf_full_cache_chunk_ms(
            model_path, ids, contexts, args.chunk, device=args.device
        )
        data["hf_threads"] = threads
    write_json(out, data)
    report(data, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
