"""``infmllm-bench-needle``: after a long drive, does the model remember what it saw, and when?

For each drive length x policy x capacity: stream a bag-free drive (real video looped, real
photos inserted at known times) through a :class:`StreamSession`, then ask about every event
("Did you see a cat? When?", not kept in context) and score the answers (object named, time within
+-30 s). Reports accuracy, per-frame ingest cost (median/p95 ms), process RSS over the drive,
time to first token and decode tokens/s; writes JSON, markdown and a PNG of accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..kvcache import CacheFullError
from ..kvcache.policies import POLICIES
from ..runtime.procstat import rss_mib
from .common import machine, markdown_table, write_json


def run_drive(session, drive, log_every: int = 60) -> dict:
    """Ingest every frame of ``drive`` into ``session``, ask every event's question, score.

    Returns:
        dict with per-event answers and scores, ingest ms per frame, RSS samples (MiB) per
        minute of drive, and ``overflow`` (a full cache that ran out of room, if it did).
    """
    from ..runtime.drive import score_answer

    ingest_ms, rss = [], []
    overflow = None
    for i, (t, rgb, _) in enumerate(drive.frames()):
        t0 = time.perf_counter()
        try:
            session.ingest_frame(rgb, t)
        except CacheFullError as exc:
            overflow = f"full cache ran out at t={t:.0f}s: {exc}"
            break
        ingest_ms.append((time.perf_counter() - t0) * 1e3)
        if i % max(1, int(60 * drive.fps)) == 0:
            rss.append(rss_mib())
        if log_every and i % log_every == 0:
            print(f"  t={t:.0f}s ingest {np.median(ingest_ms[-log_every:]):.0f} ms, "
                  f"cache {session.cache.length} tokens", file=sys.stderr, flush=True)
    answers = []
    for ev in drive.schedule:
        a = session.ask(ev.question, max_new_tokens=32, keep_in_context=False)
        answers.append({"label": ev.label, "time_s": ev.time_s, "answer": a.text, "ttft_s": a.ttft_s,
                        "decode_tokens_per_s": a.decode_tokens_per_s, **score_answer(a.text, ev)})
    ms = np.asarray(ingest_ms)
    return {"answers": answers, "accuracy": float(np.mean([a["correct"] for a in answers])),
            "named": float(np.mean([a["named"] for a in answers])),
            "ingest_ms_median": float(np.median(ms)), "ingest_ms_p95": float(np.percentile(ms, 95)),
            "rss_mib_per_minute": rss, "overflow": overflow,
            "ttft_s_median": float(np.median([a["ttft_s"] for a in answers])),
            "decode_tokens_per_s_median": float(np.median([a["decode_tokens_per_s"] for a in answers]))}


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-bench-needle", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", action="append", required=True, help="background video (repeatable)")
    p.add_argument("--events", default=None, help="folder of event images named by label "
                   "(default: photos bundled with scikit-image)")
    p.add_argument("--minutes", type=_csv(float), default=[5.0, 20.0, 60.0], help="drive lengths")
    p.add_argument("--fps", type=float, default=1.0, help="sampled frames per second of drive")
    p.add_argument("--policy", type=_csv(str), default=["full", "window", "streaming_llm", "h2o", "inf_mllm"])
    p.add_argument("--capacity", type=_csv(int), default=[1024], help="KV capacities (tokens)")
    p.add_argument("--seed", type=int, default=0, help="event-time seed")
    p.add_argument("--json", required=True, help="output JSON (markdown and PNG beside it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Console entry point; returns the exit code (2 on bad input)."""
    args = parse_args(argv)
    from ..runtime.drive import Drive, bundled_events, events_from_dir, video_frames
    from ..runtime.embedded import load_embedded

    try:
        unknown = [p for p in args.policy if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown KV-cache policy {unknown[0]!r}; choose from {sorted(POLICIES)}")
        videos = [video_frames(v, args.fps) for v in args.video]
        events = events_from_dir(args.events) if args.events else bundled_events()
    except (FileNotFoundError, ValueError) as exc:
        print(f"infmllm-bench-needle: error: {exc}", file=sys.stderr)
        return 2
    model = load_embedded()

    def background(t: float):
        return videos[int(t // 60) % len(videos)](t)  # switch clip every minute

    out = Path(args.json)
    data = {"machine": machine(), "config": vars(args), "runs": {}}
    for minutes in args.minutes:
        drive = Drive(background, minutes, args.fps, events, seed=args.seed)
        for cap in args.capacity:
            for policy in args.policy:
                # full: as large as the model's context allows, i.e. "full where memory allows".
                size = model.decoder.cfg.max_position_embeddings - 64 if policy == "full" else cap
                key = f"{policy}@{size},{minutes:g}min"
                print(f"[{key}]", file=sys.stderr, flush=True)
                session = model.session(capacity=size, policy=policy, recent=cap // 4)
                data["runs"][key] = {"policy": policy, "capacity": size, "minutes": minutes,
                                     "manifest": drive.manifest(), **run_drive(session, drive)}
                write_json(out, data)
    rows = [[r["minutes"], r["policy"], r["capacity"], r["accuracy"], r["named"], r["ingest_ms_median"],
             r["ingest_ms_p95"], r["ttft_s_median"], r["decode_tokens_per_s_median"], r["overflow"] or ""]
            for r in data["runs"].values()]
    md = ["# Needle in the drive", "", f"Machine: {data['machine']['cpu']}, {data['machine']['cores']} cores.", "",
          markdown_table(["minutes", "policy", "capacity", "accuracy", "named", "ingest ms median",
                          "ingest ms p95", "TTFT s", "decode tok/s", "note"], rows)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
