"""``infmllm-bench-stream``: per-frame ingest cost, TTFT and decode speed of a VLM family at real
shapes, against ``transformers`` with the same weights and a full cache, in the same run.

    infmllm-bench-stream --model smolvlm2-256m --random-weights --slots 1024 4096 \\
        --json bench/results/stream_cpu.json

For each cache size S (tokens), both sides first hold S tokens of stream (the same frame chunk
repeated: one stored frame is a user turn with the tag, image markers and vision tokens):

* ours: a :class:`StreamSession` with an ``inf_mllm`` cache of S slots, full, and no lazy-eviction
  slack, so every new frame evicts (the worst case; with the default slack most frames do not); per
  frame: vision tower + projector (``vision_ms``), prefill of the frame chunk
  (``prefill_ms``) and the eviction (selection + compaction, ``evict_ms``);
* transformers: the same checkpoint's ``*ForConditionalGeneration``, a ``DynamicCache`` holding
  the S tokens; per frame: ``get_image_features`` and the language model over the frame chunk
  (then the cache is cropped back to S, so the context stays S);
* both: TTFT of a question (prefill + first token) and greedy decode tokens per second.

``--backends torch onnxruntime`` measures ours on each backend (onnxruntime: the family's vision,
embedding and decoder-step engines, exported first; export seconds and engine bytes on disk are
reported). ``--onnxruntime-genai`` (Qwen2.5-VL; ``pip install onnxruntime-genai``) adds ONNX
Runtime GenAI's model builder and runtime as a peer on the same checkpoint: its text decoder
(``qwen2_5_vl_text``, GroupQueryAttention, its own KV cache) holds the same S context tokens,
then answers the same question; its vision model is not built by the builder, so it has no frame
figures. ``--layers N`` keeps N decoder layers of the shape (a 3B model does not fit twice in
24 GiB); a token's decoder cost is linear in the layers.

Speed does not depend on weight values, so ``--random-weights`` builds a checkpoint of the
named shape (:data:`.random_models.SHAPES`) with random weights; no download. Positions on the
transformers side are 1-D (cost is what is measured, not answers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import check_device, describe, machine, synchronizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-bench-stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory, or a shape with --random-weights")
    p.add_argument("--random-weights", action="store_true", help="build a random checkpoint of the --model shape")
    p.add_argument("--slots", type=int, nargs="+", default=[1024, 4096, 16384], help="cache sizes (tokens)")
    p.add_argument("--frames", type=int, default=6, help="timed frames per cache size")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timed answer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--no-peer", action="store_true", help="skip transformers (ours only)")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["torch"],
        choices=("torch", "onnxruntime", "compiled"),
        help="our backends to measure",
    )
    p.add_argument("--engine-dir", default=None, help="onnxruntime engines (default: a fresh temporary folder)")
    p.add_argument(
        "--onnxruntime-genai",
        action="store_true",
        help="also ONNX Runtime GenAI's model builder + runtime (Qwen2.5-VL text decoder)",
    )
    p.add_argument("--layers", type=int, default=None, help="with --random-weights: keep this many decoder layers")
    p.add_argument("--json", required=True, help="output JSON (a .md table is written beside it)")
    return p.parse_args(argv)


def test_frame(seed: int, size: int = 640) -> np.ndarray:
    """A camera-sized RGB frame (uint8 ``[480, 640, 3]``), different per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8)


def run_ours(
    model,
    slots: int,
    frames: int,
    new_tokens: int,
    device: torch.device,
    backend: str = "torch",
    engine_dir: str | Path = "engines",
) -> dict:
    """Ingest and answer figures of our session with a full ``inf_mllm`` cache of ``slots`` on
    ``backend`` (``prepare_s``: exporting / compiling / loading its engines, the ones an earlier
    run left in ``engine_dir`` reused; ``engine_bytes``: the files of the engines it runs)."""
    sync = synchronizer(device)
    from ..runtime.backends import make_backend
    from ..runtime.generate import decode
    from ..runtime.session import StreamSession

    runner = make_backend(
        backend, model.decoder, engine_dir, model.name, lambda line: print(line, file=sys.stderr), model
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    s = StreamSession(
        model,
        capacity=slots,
        policy="inf_mllm",
        recent=slots // 4,
        novelty_threshold=0.0,
        familiar_interval_s=0.0,
        slack=0,
        backend=runner,
    )  # eager eviction: the worst case
    prepare_s = time.perf_counter() - t0
    engines = [
        e.path
        for e in (getattr(runner, "vision", None), getattr(runner, "embedding", None), getattr(runner, "step", None))
        if hasattr(e, "path")
    ]  # the engine files the run uses (and their external data)
    engine_bytes = sum(f.stat().st_size for e in engines for f in (e, e.with_name(e.name + ".data")) if f.is_file())
    enc = model.encode_frame(test_frame(0), runner.vision)
    chunk = model.frame_chunk("<frame t=0.0s cam=front>", enc)
    embeds, kinds = s.chunk_embeds(chunk)
    while s.cache.length + len(chunk) <= slots:  # fill the stream with stored frames (no vision cost)
        s.backend.run_chunk(
            embeds,
            s.cache,
            kinds,
            frame_id=0,
            stamp_s=0.0,
            logits=False,
            mrope=chunk.mrope,
            deepstack=chunk.deepstack_inputs(),
        )
    commit, evict_ms = s.cache.commit, []

    def timed_commit():
        sync()
        t0 = time.perf_counter()
        out = commit()
        sync()
        if out:
            evict_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    s.cache.commit = timed_commit
    rows = []
    for i in range(frames + 1):  # the first frame warms up
        before = len(evict_ms)
        r = s.ingest_frame(test_frame(i + 1), float(i + 1))
        sync()
        ev = evict_ms[-1] if len(evict_ms) > before else 0.0
        rows.append((r.vision_ms, r.prefill_ms - ev, ev, r.tokens))
    rows = rows[1:]
    q = model.tokenizer.encode(model.tokenizer.render_turn("user", "What did you see, and when?", True))
    snap = s.cache.snapshot()
    sync()
    t0 = time.perf_counter()
    last = s.backend.run_chunk(s._embed_ids(q), s.cache)
    sync()
    t1 = time.perf_counter()
    out = decode(s.backend, s.cache, last, new_tokens)  # no stop tokens: exactly new_tokens
    sync()
    t2 = time.perf_counter()
    s.cache.restore(snap)
    return {
        "vision_ms": statistics.median(r[0] for r in rows),
        "prefill_ms": statistics.median(r[1] for r in rows),
        "evict_ms": statistics.median(r[2] for r in rows),
        "frame_tokens": rows[0][3],
        "ttft_s": t1 - t0,
        "decode_tokens_per_s": (len(out) - 1) / (t2 - t1) if len(out) > 1 else 0.0,
        "kv_bytes": s.cache.nbytes,
        "prepare_s": prepare_s,
        "engine_bytes": engine_bytes,
        "gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def run_onnxruntime_genai(path: Path, model, slots: int, new_tokens: int, out: Path) -> dict:
    """ONNX Runtime GenAI on the same checkpoint: its builder's text decoder (fp32, CPU) into
    ``out``, then the question's TTFT and decode tok/s with ``slots`` tokens of the frame chunk's
    ids already in its KV cache (``build_s``: the builder's run, ``engine_bytes``: its files)."""
    import subprocess

    import onnxruntime_genai as og

    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(path),
            "-o",
            str(out),
            "-p",
            "fp32",
            "-e",
            "cpu",
        ],
        check=True,
        capture_output=True,
    )
    build_s = time.perf_counter() - t0
    og_model = og.Model(str(out))
    chunk = model.frame_chunk("<frame t=0.0s cam=front>", model.encode_frame(test_frame(0)))
    ids = chunk.ids(model.image_token_id)
    context = (ids * (slots // len(ids)))[: slots - len(ids) + 1]
    q = model.tokenizer.encode(model.tokenizer.render_turn("user", "What did you see, and when?", True))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(context) + len(q) + new_tokens + 1, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.append_tokens(np.array([context], dtype=np.int32))
    t0 = time.perf_counter()
    gen.append_tokens(np.array([q], dtype=np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    return {
        "ttft_s": t1 - t0,
        "decode_tokens_per_s": (new_tokens - 1) / (t2 - t1),
        "context_tokens": len(context),
        "build_s": build_s,
        "engine_bytes": sum(f.stat().st_size for f in out.glob("*.onnx*")),
    }


def run_transformers(path: Path, model, slots: int, frames: int, new_tokens: int, device: torch.device, dtype) -> dict:
    """The same figures from transformers with a full ``DynamicCache`` of ``slots`` tokens."""
    sync = synchronizer(device)
    from transformers import AutoModelForImageTextToText, DynamicCache

    ref = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).to(device).eval()
    lm = ref.model.language_model if hasattr(ref.model, "language_model") else ref.model.text_model
    embed = lm.get_input_embeddings()
    qwen = hasattr(model, "visual")
    enc = model.encode_frame(test_frame(0))
    chunk = model.frame_chunk("<frame t=0.0s cam=front>", enc)
    ids = torch.tensor(chunk.ids(model.image_token_id), device=device)
    chunk_embeds = embed(ids)
    chunk_embeds[len(chunk.before) : len(chunk.before) + chunk.vision_tokens] = enc.embeds.to(device, dtype)
    cache = DynamicCache(config=lm.config)
    with torch.inference_mode():
        filled = 0
        while filled + ids.numel() <= slots:
            lm(inputs_embeds=chunk_embeds[None], past_key_values=cache, use_cache=True)
            filled += ids.numel()
        rows = []
        for i in range(frames + 1):
            rgb = test_frame(i + 1)
            sync()
            t0 = time.perf_counter()
            if qwen:
                px = model.processor(images=[rgb], return_tensors="pt")
                feats = ref.model.get_image_features(
                    px["pixel_values"].to(device, dtype), px["image_grid_thw"].to(device)
                ).pooler_output[0]
            else:
                px = model.processor(images=[[rgb]], return_tensors="pt")
                feats = ref.model.get_image_features(
                    px["pixel_values"].to(device, dtype), px["pixel_attention_mask"].to(device)
                ).pooler_output[0]
            sync()
            t1 = time.perf_counter()
            x = chunk_embeds.clone()
            x[len(chunk.before) : len(chunk.before) + feats.shape[0]] = feats
            lm(inputs_embeds=x[None], past_key_values=cache, use_cache=True)
            sync()
            t2 = time.perf_counter()
            cache.crop(filled - cache.get_seq_length())  # drop the frame again (a negative count)
            rows.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
        rows = rows[1:]
        q = torch.tensor(
            model.tokenizer.encode(model.tokenizer.render_turn("user", "What did you see, and when?", True)),
            device=device,
        )
        sync()
        t0 = time.perf_counter()
        h = lm(inputs_embeds=embed(q)[None], past_key_values=cache, use_cache=True).last_hidden_state
        tok = ref.lm_head(h[:, -1]).argmax(-1)
        sync()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            h = lm(inputs_embeds=embed(tok)[None], past_key_values=cache, use_cache=True).last_hidden_state
            tok = ref.lm_head(h[:, -1]).argmax(-1)
        sync()
        t2 = time.perf_counter()
    kv = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * chunk_embeds.element_size()
    return {
        "vision_ms": statistics.median(r[0] for r in rows),
        "prefill_ms": statistics.median(r[1] for r in rows),
        "ttft_s": t1 - t0,
        "decode_tokens_per_s": (new_tokens - 1) / (t2 - t1),
        "context_tokens": filled,
        "kv_bytes_after": kv,
    }


def report(data: dict, out: Path) -> None:
    """Markdown table beside the JSON: a row per cache size and side."""
    lines = [
        f"# Stream ingest and answer speed: {data['model']}",
        "",
        f"{data['machine']} Date: {data['date']}. Command: `{data['command']}`.",
        "",
        "Per frame (ms, median): vision tower + projector, prefill of the frame chunk, eviction; the "
        "question's TTFT and greedy decode with the cache full. `vs torch`: ours-on-torch's time over this "
        "row's (above 1: this row is faster). Engine files: bytes on disk and the seconds to export them.",
        "",
        "| slots | side | frame tokens | vision | prefill | evict | frame ms | TTFT s | tok/s | frame vs torch | "
        "decode vs torch | engines MiB | export s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in data["runs"]:
        base = r["ours"].get("torch")
        sides = [(f"ours {name}", o) for name, o in r["ours"].items()]
        sides += [(peer, r[peer]) for peer in ("transformers", "onnxruntime_genai") if r.get(peer)]
        for side, o in sides:
            frame = None if "vision_ms" not in o else o["vision_ms"] + o["prefill_ms"] + o.get("evict_ms", 0.0)
            vs_frame = base and frame and (base["vision_ms"] + base["prefill_ms"] + base["evict_ms"]) / frame
            vs_decode = base and base["decode_tokens_per_s"] and o["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            mib = o.get("engine_bytes") or None
            lines.append(
                f"| {r['slots']} | {side} | {o.get('frame_tokens', '-')} | {cell(o.get('vision_ms'), '.0f')} | "
                f"{cell(o.get('prefill_ms'), '.0f')} | {cell(o.get('evict_ms'), '.1f')} | {cell(frame, '.0f')} | "
                f"{o['ttft_s']:.2f} | {o['decode_tokens_per_s']:.1f} | {cell(vs_frame, '.2f')} | "
                f"{cell(vs_decode, '.2f')} | {cell(mib and mib / 2**20, '.0f')} | "
                f"{cell(o.get('prepare_s', o.get('build_s')) if mib else None, '.0f')} |"
            )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    """Console entry point; returns the exit status (2 on bad input)."""
    args = parse_args(argv)
    from ..models import load_model
    from ..models.registry import DTYPES
    from .random_models import SHAPES, build_random_checkpoint

    try:
        device = check_device(args.device)
        if args.random_weights:
            if args.model not in SHAPES:
                raise ValueError(f"--random-weights needs a shape: one of {sorted(SHAPES)}")
            tmp = tempfile.TemporaryDirectory(prefix="infmllm-random-")
            print(f"building random {args.model} weights in {tmp.name} ...", file=sys.stderr, flush=True)
            path = build_random_checkpoint(args.model, tmp.name, dtype=DTYPES[args.precision], layers=args.layers)
        else:
            path = Path(args.model)
        model = load_model(str(path), args.device, args.precision)
        if min(args.slots) < 256:
            raise ValueError("--slots must be >= 256 tokens")
        if args.onnxruntime_genai:
            if model.family != "qwen2_5_vl":
                raise ValueError("--onnxruntime-genai compares Qwen2.5-VL checkpoints (its builder's qwen2_5_vl)")
            import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("infmllm-bench-stream: error: --onnxruntime-genai needs `pip install onnxruntime-genai`", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"infmllm-bench-stream: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.json)
    data = {
        "model": args.model,
        "family": model.family,
        "random_weights": args.random_weights,
        "machine": describe(machine()),
        "date": time.strftime("%Y-%m-%d"),
        "command": "infmllm-bench-stream " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": [],
    }
    work = tempfile.TemporaryDirectory(prefix="infmllm-engines-")
    engine_dir = Path(args.engine_dir or work.name)
    for slots in args.slots:
        run: dict = {"slots": slots, "ours": {}}
        for backend in args.backends:
            print(f"[{slots} slots] ours on {backend} ...", file=sys.stderr, flush=True)
            try:
                run["ours"][backend] = run_ours(model, slots, args.frames, args.new_tokens, device, backend, engine_dir)
            except ValueError as exc:  # a cache too small for this model's prompt and frames
                print(f"infmllm-bench-stream: error: {exc}", file=sys.stderr)
                return 2
        if args.onnxruntime_genai:
            print(f"[{slots} slots] onnxruntime-genai ...", file=sys.stderr, flush=True)
            run["onnxruntime_genai"] = run_onnxruntime_genai(
                path, model, slots, args.new_tokens, Path(work.name) / "genai"
            )
        if not args.no_peer:
            print(f"[{slots} slots] transformers ...", file=sys.stderr, flush=True)
            run["transformers"] = run_transformers(
                path, model, slots, args.frames, args.new_tokens, device, DTYPES[args.precision]
            )
        data["runs"].append(run)
        out.write_text(json.dumps(data, indent=1))
        report(data, out)
        print(json.dumps(run), file=sys.stderr, flush=True)
    return 0
