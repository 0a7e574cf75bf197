"""``infmllm-chat``: stream a video file (or images) through a session with any supported model
and cache policy, then answer questions about it. The way to try a model without ROS.

    infmllm-chat --model ~/models/Qwen2.5-VL-3B-Instruct --video drive.mp4 --fps 1 \\
        --question "Was there a cyclist?" --question "What colour was the truck?"

Prints progress while frames go in, then each answer with the times of the frames in the cache
that match the question (sightings). ``--json OUT`` writes the same as a report. Exit status:
0 answered, 2 bad input (a missing file, an unsupported or broken model, a bad setting: the
message says which), 1 a failure while streaming.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from ..kvcache import POLICIES
from ..runtime.backends import BACKENDS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-chat", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2-135m", help="preset (smollm2-135m), GGUF file or Hugging Face checkpoint directory"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="video file (OpenCV decodes it)")
    src.add_argument("--image", action="append", help="image file; repeat for several (one per 1/fps seconds)")
    p.add_argument("--question", action="append", required=True, help="question; repeat for several")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (> 0)")
    p.add_argument("--policy", default="inf_mllm", choices=sorted(POLICIES), help="KV-cache eviction policy")
    p.add_argument("--capacity", type=int, default=1024, help="KV-cache slots (tokens)")
    p.add_argument("--recent", type=int, default=None, help="protected newest tokens (default capacity / 4)")
    p.add_argument("--camera", default="front", help="camera name in the frame tags")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (tokens)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:N)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="weights of an HF model")
    p.add_argument(
        "--backend",
        default="torch",
        choices=tuple(BACKENDS),
        help="inference backend, as the node's `backend` (onnxruntime: every family's engines, exported "
        "into --engine-dir on first use)",
    )
    p.add_argument("--engine-dir", default="engines", help="folder of the model's engines (as the node's engine_dir)")
    p.add_argument(
        "--novelty-threshold",
        type=float,
        default=None,
        help="novelty gate: a frame's vision tokens are stored when it differs from the scene by more "
        "(0..1; default: the family's)",
    )
    p.add_argument("--json", help="write answers, sightings and ingest figures here")
    return p.parse_args(argv)


def frames(args):
    """``(t seconds, RGB)`` from the video or the images (image ``i`` at ``i / fps``).

    Raises:
        FileNotFoundError: a missing file. ValueError: a file OpenCV cannot decode.
    """
    import cv2

    from ..bench.drive import iter_video

    if args.video:
        yield from iter_video(args.video, args.fps)
        return
    for i, name in enumerate(args.image):
        if not Path(name).is_file():
            raise FileNotFoundError(f"image not found: {name}")
        bgr = cv2.imread(name, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{name}: OpenCV cannot decode this image")
        yield i / args.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def main(argv=None) -> int:
    """Console entry point; returns the exit status."""
    args = parse_args(argv)
    from ..models import load_model
    from ..runtime.session import open_session

    try:
        if not args.fps > 0:
            raise ValueError(f"--fps must be > 0, got {args.fps}")
        if args.video and not Path(args.video).is_file():
            raise FileNotFoundError(f"video not found: {args.video}")
        if not all(q.strip() for q in args.question):
            raise ValueError("a --question is empty")
        t0 = time.perf_counter()
        model = load_model(args.model, args.device, args.precision)
        session = open_session(
            model,
            args.backend,
            args.engine_dir,
            capacity=args.capacity,
            policy=args.policy,
            recent=args.recent if args.recent is not None else args.capacity // 4,
            novelty_threshold=args.novelty_threshold,
            progress=lambda line: print(line, file=sys.stderr),
        )
        print(
            f"model {model.name} ({model.family}) loaded in {time.perf_counter() - t0:.1f} s; "
            f"{args.policy} cache of {args.capacity} slots",
            file=sys.stderr,
        )
        stream = frames(args)
        first = next(stream)  # a video OpenCV cannot open fails here, before any work
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # input, model, engine, device
        print(f"infmllm-chat: error: {exc}", file=sys.stderr)
        return 2
    ingest = []
    try:
        for n, (t, rgb) in enumerate(itertools.chain([first], stream)):
            r = session.ingest_frame(rgb, t, args.camera)
            ingest.append(
                {
                    "t": t,
                    "stored": r.stored,
                    "novel": r.novel,
                    "tokens": r.tokens,
                    "vision_ms": r.vision_ms,
                    "prefill_ms": r.prefill_ms,
                    "evicted": r.evicted_tokens,
                }
            )
            if n % 30 == 0:
                print(
                    f"  t={t:7.1f} s  frames {n + 1}  cache {session.cache.length}/{args.capacity}  "
                    f"{r.vision_ms + r.prefill_ms:.0f} ms/frame",
                    file=sys.stderr,
                )
        answers = []
        for q in args.question:
            a = session.ask(q, max_new_tokens=args.max_new_tokens, keep_in_context=False)
            seen = ", ".join(f"t={s.stamp_s:.1f}s ({s.score:.2f})" for s in a.sightings) or "none"
            print(
                f"Q: {q}\nA: {a.text}\n   sightings: {seen}; ttft {a.ttft_s:.2f} s, {a.decode_tokens_per_s:.1f} tok/s"
            )
            answers.append(
                {
                    "question": q,
                    "answer": a.text,
                    "ttft_s": a.ttft_s,
                    "decode_tokens_per_s": a.decode_tokens_per_s,
                    "sightings": [{"t": s.stamp_s, "score": s.score} for s in a.sightings],
                }
            )
    except (ValueError, RuntimeError) as exc:
        print(f"infmllm-chat: failed while streaming: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "family": model.family,
                    "policy": args.policy,
                    "capacity": args.capacity,
                    "frames": ingest,
                    "answers": answers,
                },
                indent=1,
            )
        )
    return 0
