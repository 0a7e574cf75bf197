"""``make gpu-check``: the one prepared check of a GPU machine, at real shapes, in minutes.

A GPU machine is available for minutes at a time and cannot install anything: it has its own
``python3`` (torch + CUDA, transformers, onnxruntime, CuPy, Triton, nvcc). This script runs there from the
working tree, without a virtual environment, and writes everything under one folder (``--out``):

0. ``env.json``: the device, the versions, and any module the steps need that is missing (named
   first, so the minutes are not spent finding out).
1. ``cuda_tests.log``: the CUDA parity tests (``test/test_cuda_parity.py``,
   ``test/test_cuda_compile.py``, ``test/test_compiled_backend.py``), when pytest is importable
   (collected only in the dry run).
2. ``compiled_parity_h100.json``: at the real shape (random weights), the compiled backend's
   CUDA-graph decode against the eager torch path, our kernels keeping the cache: logits after
   each decoded token, max |diff|.
3. ``stream_<shape>_h100.json/.md``: :mod:`.stream` at the Qwen2.5-VL-3B shape (4K / 16K / 32K
   slots) and the SmolVLM2-2.2B shape (4K / 8K / 15K: its trained context is 16K), fp16, random
   weights, backends torch and compiled against transformers in the same run: ms per stored frame
   (vision, prefill, eviction), TTFT, decode tok/s, GPU memory;
   plus the fraction of the HBM read roofline (bytes a decoded token reads: the decoder's weights
   and the full KV buffer, over the measured copy rate).
4. ``gpu_check_h100.json``'s ``hour``: a time-compressed hour, 3600 frames at the 3B shape through
   a 16K-slot cache, each stored (64 vision tokens): per-frame cost and GPU memory by tenth of
   the hour, and their spread.

``--dry-run`` runs the same steps at tiny shapes on the CPU (CI runs it, so the script cannot
rot): every step executes, no figure means anything. Each step is bounded (``--budget-s``, total
seconds); a step that fails is recorded in ``summary.json`` and the next one runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from .common import describe, machine, synchronizer, write_json
from .decode import read_rate_gb_s, token_bytes

#: What each run checks: the stream step's (shape, slot sizes), the shapes of the parity and hour
#: steps, the hour's frames and cache, the frames timed per slot size, device and precision.
REAL = {
    "stream": [
        ("qwen2.5-vl-3b", [4096, 16384, 32768]),
        ("smolvlm2-2.2b", [4096, 8192, 15360]),
    ],  # its trained context is 16K tokens
    "parity_shape": "qwen2.5-vl-3b",
    "hour_shape": "qwen2.5-vl-3b",
    "hour_frames": 3600,
    "hour_slots": 16384,
    "frames": 4,
    "device": "cuda",
    "precision": "fp16",
}
DRY = {
    "stream": [("qwen2.5-vl-tiny", [512]), ("smolvlm2-tiny", [512])],
    "parity_shape": "qwen2.5-vl-tiny",
    "hour_shape": "qwen2.5-vl-tiny",
    "hour_frames": 60,
    "hour_slots": 512,
    "frames": 1,
    "device": "cpu",
    "precision": "fp32",
}
NEEDED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "cv2", "onnxruntime")
CUDA_TESTS = ("test/test_cuda_parity.py", "test/test_cuda_compile.py", "test/test_compiled_backend.py")
ROOT = Path(__file__).resolve().parents[2]


def preflight(dry: bool) -> dict:
    """Device, versions and missing modules (``missing``: names; ``cuda``: whether a GPU is usable)."""
    missing = [m for m in (*NEEDED, "pytest") if importlib.util.find_spec(m) is None]
    env = {"machine": machine(), "missing": missing, "cuda": torch.cuda.is_available(), "dry_run": dry}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


def cuda_tests(out: Path, collect_only: bool = False) -> dict:
    """pytest over :data:`CUDA_TESTS`, its output in the log; ``collect_only`` (the dry run: on
    the CPU they skip, and ``make test`` runs them already) only collects them."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(["--collect-only"] if collect_only else []),
            *CUDA_TESTS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    (out / "cuda_tests.log").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def compiled_parity(model, device: torch.device, tokens: int = 24) -> dict:
    """Decode ``tokens`` greedily after a few frames, eager torch path and compiled step (CUDA
    graph on a GPU) on twin sessions; the max |diff| of the logits of every decoded token."""
    from ..runtime.backends import make_backend
    from ..runtime.session import StreamSession
    from .stream import test_frame

    sessions = []
    for name in ("torch", "compiled"):
        backend = make_backend(name, model.decoder, progress=lambda line: print(line, file=sys.stderr))
        s = StreamSession(
            model, capacity=1024, recent=256, novelty_threshold=0.0, familiar_interval_s=0.0, backend=backend
        )
        for i in range(4):
            s.ingest_frame(test_frame(i), float(i))
        sessions.append(s)
    q = model.tokenizer.encode(model.tokenizer.render_turn("user", "What did you see, and when?", True))
    worst, same = 0.0, True
    with torch.inference_mode():
        logits = [s.backend.run_chunk(s._embed_ids(q), s.cache) for s in sessions]
        for _ in range(tokens):
            worst = max(worst, float((logits[0] - logits[1]).abs().max()))
            ids = [int(x.argmax()) for x in logits]
            same &= ids[0] == ids[1]
            logits = [
                s.backend.run_chunk(s.backend.embed(torch.tensor([ids[0]], device=device)), s.cache) for s in sessions
            ]
    return {
        "max_abs_logit_diff": worst,
        "greedy_tokens_identical": same,
        "tokens": tokens,
        "backend_step": type(sessions[1].backend).__name__,
    }


def add_roofline(data: dict, model, read_gb_s: float) -> None:
    """Per run and backend: ``roofline_fraction`` = bytes a decoded token reads
    (:func:`.decode.token_bytes`: the linear layers' weights, plus the run's whole K/V buffer) x
    tok/s / the measured read rate."""
    weights = token_bytes(model.decoder, 0)
    for run in data["runs"]:
        for figures in run["ours"].values():
            per_token = weights + figures["kv_bytes"]
            figures["roofline_fraction"] = per_token * figures["decode_tokens_per_s"] / (read_gb_s * 1e9)


def hour(model, frames: int, slots: int, device: torch.device) -> dict:
    """``frames`` stored frames (one per second of stream) through one session of ``slots``: frame
    ms and device memory by tenth of the stream, and their spread (max/min of the tenths' medians)."""
    from ..runtime.session import StreamSession
    from .stream import test_frame

    s = StreamSession(model, capacity=slots, recent=slots // 4, novelty_threshold=0.0, familiar_interval_s=0.0)
    sync = synchronizer(device)
    ms, mem = [], []
    for i in range(frames):
        sync()
        t0 = time.perf_counter()
        s.ingest_frame(test_frame(i % 97), float(i))
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)
        mem.append(torch.cuda.memory_allocated() if device.type == "cuda" else 0)
    tenth = max(1, frames // 10)
    parts = [(statistics.median(ms[i : i + tenth]), max(mem[i : i + tenth])) for i in range(0, frames, tenth)]
    parts = parts[1:] or parts  # the first tenth warms up
    return {
        "frames": frames,
        "tenths": [{"frame_ms": p[0], "memory_bytes": p[1]} for p in parts],
        "time_spread": max(p[0] for p in parts) / min(p[0] for p in parts),
        "memory_spread": (max(p[1] for p in parts) / min(p[1] for p in parts)) if parts[0][1] else 1.0,
        "evicted_tokens": s.cache.evicted_tokens,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (everything goes here)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: every step runs, quickly")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting steps after this many seconds")
    args = p.parse_args(argv)
    plan, start = (DRY if args.dry_run else REAL), time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "dry" if args.dry_run else "h100"
    env = preflight(args.dry_run)
    write_json(out / "env.json", env)
    print(f"[0] {describe(env['machine'])} missing: {env['missing'] or 'nothing'}", flush=True)
    if not args.dry_run and not env["cuda"]:
        print("gpu-check: no CUDA device; run with DRY_RUN=1 on a CPU machine", file=sys.stderr)
        return 2
    if [m for m in env["missing"] if m != "pytest"]:
        print(f"gpu-check: missing modules {env['missing']}: carry their wheels (see the Makefile)", file=sys.stderr)
        return 2
    from ..models import load_model
    from ..models.registry import DTYPES
    from . import stream
    from .random_models import build_random_checkpoint

    device = torch.device(plan["device"])
    summary: dict = {"steps": {}}
    work = tempfile.TemporaryDirectory(prefix="gpu-check-")
    models: dict = {}

    def model_of(shape: str):
        if shape not in models:
            path = build_random_checkpoint(shape, Path(work.name) / shape, dtype=DTYPES[plan["precision"]])
            models[shape] = (path, load_model(str(path), plan["device"], plan["precision"]))
        return models[shape]

    def step(name: str, fn) -> None:
        if time.perf_counter() - start > args.budget_s:
            summary["steps"][name] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
            return
        t0 = time.perf_counter()
        print(f"[{len(summary['steps']) + 1}] {name} ...", flush=True)
        try:
            summary["steps"][name] = {"result": fn(), "seconds": time.perf_counter() - t0}
        except Exception as exc:  # one failed step must not cost the others their minutes
            summary["steps"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
        write_json(out / "summary.json", summary)

    if "pytest" not in env["missing"]:
        step("cuda_tests", lambda: cuda_tests(out, collect_only=args.dry_run))
    step("compiled_parity", lambda: compiled_parity(model_of(plan["parity_shape"])[1], device))
    read_gb_s = read_rate_gb_s(plan["device"], mib=1024 if device.type == "cuda" else 64)
    summary["read_gb_s"] = read_gb_s
    for shape, slots in plan["stream"]:

        def run_stream(shape=shape, slots=slots):
            path, model = model_of(shape)
            json_path = out / f"stream_{shape.replace('.', '_').replace('-', '_')}_{suffix}.json"
            rc = stream.main(
                [
                    "--model",
                    str(path),
                    "--slots",
                    *map(str, slots),
                    "--frames",
                    str(plan["frames"]),
                    "--new-tokens",
                    "32",
                    "--device",
                    plan["device"],
                    "--precision",
                    plan["precision"],
                    "--backends",
                    "torch",
                    "compiled",
                    "--json",
                    str(json_path),
                ]
            )
            data = json.loads(json_path.read_text())
            add_roofline(data, model, read_gb_s)
            json_path.write_text(json.dumps(data, indent=1))
            return {"returncode": rc, "file": json_path.name}

        step(f"stream {shape}", run_stream)
    step("hour", lambda: hour(model_of(plan["hour_shape"])[1], plan["hour_frames"], plan["hour_slots"], device))
    write_json(out / f"gpu_check_{suffix}.json", {**summary, "env": env})
    failed = [n for n, s in summary["steps"].items() if "error" in s]
    print(
        f"gpu-check: {len(summary['steps']) - len(failed)} steps done, failed: {failed or 'none'} "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
