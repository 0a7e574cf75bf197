"""``infmllm-bench-needle``: after a long drive, does the model remember what it saw, and when?

For each drive length x policy x capacity: stream a bag-free drive (real video looped, real
photos inserted at known times) through a :class:`StreamSession` (or, for ``--policy index``, the
retrieval baseline of :mod:`.retrieval`), then ask about every event
("Did you see a cat? When?", not kept in context) and score the answers: object named in the
text and a time stated by the text within +-10 s of the event (+-60 s on drives over 10 minutes,
:func:`~.drive.time_tolerance_s`); ``recalled``: the answer's best sighting (the cached frame that
matches the question, :mod:`infmllm_ros.runtime.recall`) that close. With ``--poses`` a synthetic
odometry track streams beside the frames and each answer is scored for where too. Reports
accuracy, per-frame ingest cost (median/p95 ms, and per minute of drive), process RSS over the
drive, time to first token and decode tokens/s; writes JSON, markdown and a PNG of accuracy
against drive length.

Every finished run is merged into ``--json`` under a file lock, so several processes (one per
core, ``OMP_NUM_THREADS=1``) can fill one grid; ``--resume`` skips runs already there.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from ..kvcache import CacheFullError
from ..kvcache.policies import DEFAULT_SLACK, MEMORY_BETA, MEMORY_DECAY, MEMORY_VISION_BUDGET, make_policy, scores_slots
from ..runtime.answer import is_clear_no, places_in
from ..runtime.pose import Pose, PoseMatcher
from ..runtime.procstat import rss_mib
from ..runtime.session import DEFAULT_FAMILIAR_INTERVAL_S
from .common import check_device, describe, machine, markdown_table, png_figure, synchronizer, write_json
from .retrieval import RetrievalSession

#: Objects no drive shows. The share of answers about them that name them anyway (``absent_named``)
#: is the rate at which "named" only echoes the question.


#: ``--policy`` name of the retrieval baseline (:mod:`.retrieval`): no KV-cache policy.
INDEX = "index"


def frame_pose(track, t: float) -> Pose:
    """The robot's pose on ``track`` at ``t`` seconds (frame ``odom``, heading about z)."""
    x, y, yaw = track.at(t)
    return Pose(x, y, 0.0, 0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2), "odom")


def run_drive(session, drive, log_every: int = 60, track=None, pose_tolerance_s: float = 0.2) -> dict:
    """Ingest every frame of ``drive`` into ``session``, ask every event's question, score.

    With ``track`` (an :class:`~.drive.OdometryTrack`), its poses stream beside the frames
    through a :class:`~infmllm_ros.runtime.pose.PoseMatcher` as a robot's odometry would, each
    event answer is scored for where (``position_error_m``: the best sighting's pose against the
    track at the event), and whether its text states a position.

    Returns:
        dict with per-event answers and scores, ingest ms over all frames (median, p95, mean,
        median per minute of drive) and over the frames stored in the cache, RSS samples (MiB) per
        minute of drive, and ``overflow`` (a full cache that ran
        out of room, if it did). A cache that overflowed cannot take a question either, so
        such a run has no answers and its scores, TTFT and decode rate are None.
    """
    from .drive import ABSENT_OBJECTS, NEAR_MISS_OBJECTS, absent_question, score_answer, score_times, time_tolerance_s

    ingest_ms, stored, rss = [], [], []
    overflow = None
    sync = synchronizer(session.cache.k.device)  # time the GPU's work too
    matcher = PoseMatcher(pose_tolerance_s) if track is not None else None
    odometry = iter(track.samples()) if track is not None else iter(())
    pending = next(odometry, None)
    for i, (t, rgb, _) in enumerate(drive.frames()):
        while pending is not None and pending[0] <= t:  # the odometry published up to this frame
            for frame_id, pose in matcher.add_pose(pending[0], frame_pose(track, pending[0])):
                session.set_frame_pose(frame_id, pose)
            pending = next(odometry, None)
        t0 = time.perf_counter()
        try:
            result = session.ingest_frame(rgb, t)
            stored.append(result.stored)
            if matcher is not None and result.stored and (pose := matcher.add_frame(result.frame_id, t)):
                session.set_frame_pose(result.frame_id, pose)
            sync()
        except CacheFullError as exc:
            overflow = f"full cache ran out at t={t:.0f}s: {exc}"
            break
        ingest_ms.append((time.perf_counter() - t0) * 1e3)
        if i % max(1, int(60 * drive.fps)) == 0:
            rss.append(rss_mib())
        if log_every and i % log_every == 0:
            print(
                f"  t={t:.0f}s ingest {np.median(ingest_ms[-log_every:]):.0f} ms, cache {session.cache.length} tokens",
                file=sys.stderr,
                flush=True,
            )
    answers, absent_asked, near_asked = [], [], []
    if overflow is None:  # an overflowed cache cannot take the question either
        tolerance = time_tolerance_s(drive.minutes)
        times: dict[str, list[float]] = {}
        for ev in drive.schedule:
            times.setdefault(ev.label, []).append(ev.time_s)
        for label, ts in times.items():  # one question per object, however often it was shown
            ev = next(e for e in drive.schedule if e.label == label)
            a = session.ask(ev.question, max_new_tokens=32, keep_in_context=False)
            seen = a.sightings[0] if a.sightings else None
            answers.append(
                {
                    "label": ev.label,
                    "time_s": ev.time_s,
                    "answer": a.text,
                    "ttft_s": a.ttft_s,
                    "decode_tokens_per_s": a.decode_tokens_per_s,
                    "seen": a.seen,
                    "confidence": a.confidence,
                    "seen_at_s": seen.stamp_s if seen else None,
                    "seen_score": seen.score if seen else None,
                    **_verdict_fields(a),
                    **score_answer(a.text, ev, tolerance, seen_at_s=seen.stamp_s if seen else None),
                    **({"times_s": ts, "repeated": score_times(a.text, ts, tolerance)} if len(ts) > 1 else {}),
                    **(_where(a, seen, track.at(ev.time_s)) if track is not None else {}),
                }
            )
        absent_asked = [
            session.ask(absent_question(label), max_new_tokens=32, keep_in_context=False) for label in ABSENT_OBJECTS
        ]
        near_asked = [
            (label, session.ask(absent_question(NEAR_MISS_OBJECTS[label]), max_new_tokens=32, keep_in_context=False))
            for label in times
            if label in NEAR_MISS_OBJECTS
        ]
    absent = [a.text for a in absent_asked]
    ms = np.asarray(ingest_ms)
    stored_ms = ms[np.asarray(stored, dtype=bool)]  # a frame that overflowed the cache is in neither
    per_min = max(1, int(60 * drive.fps))
    return {
        "ingest_ms_median_per_minute": [float(np.median(ms[i : i + per_min])) for i in range(0, len(ms), per_min)],
        "answers": answers,
        "accuracy": _mean([a["correct"] for a in answers]),
        "named": _mean([a["named"] for a in answers]),
        "absent_answers": absent,
        "absent_named": _mean([label in text.lower() for label, text in zip(ABSENT_OBJECTS, absent)]),
        "absent_seen": [a.seen for a in absent_asked],
        "absent_seen_scores": [a.sightings[0].score if a.sightings else None for a in absent_asked],
        "absent_verdicts": [_verdict_fields(a) for a in absent_asked],
        "near_miss": [
            {
                "event": label,
                "object": NEAR_MISS_OBJECTS[label],
                "answer": a.text,
                "no": is_clear_no(a.text),
                **_verdict_fields(a),
            }
            for label, a in near_asked
        ],
        "near_miss_correct": _mean([is_clear_no(a.text) for _, a in near_asked]),
        "repeated_all_timed": [a["repeated"]["all_timed"] for a in answers if "repeated" in a],
        "answers_from_evidence": sum(
            a.answer_source == "evidence" for a in [*absent_asked, *(x for _, x in near_asked)]
        )
        + sum(a["answer_source"] == "evidence" for a in answers),
        **run_scores(answers, absent, {e.label: e.words for e in drive.schedule}),
        "ingest_ms_median": float(np.median(ms)),
        "ingest_ms_p95": float(np.percentile(ms, 95)),
        "ingest_ms_mean": float(ms.mean()),
        "frames_stored": int(stored_ms.size),
        "stored_ms_median": _median(stored_ms.tolist()),
        "rss_mib_per_minute": rss,
        "overflow": overflow,
        # what holds the stream's memory: the KV buffer, or the retrieval baseline's index
        "memory_bytes": session.index_bytes if isinstance(session, RetrievalSession) else session.cache.nbytes,
        "position_error_m_median": _median(
            [a["position_error_m"] for a in answers if a.get("position_error_m") is not None and a["named"]]
        ),
        "positions_stated": _mean([a["states_position"] for a in answers]) if track is not None else None,
        "ttft_s_median": _median([a["ttft_s"] for a in answers]),
        "decode_tokens_per_s_median": _median([a["decode_tokens_per_s"] for a in answers]),
    }


def _where(answer, seen, truth: tuple[float, float, float]) -> dict:
    """An event answer's position fields: the best sighting's pose against the truth (metres),
    and whether the text states a position."""
    pose = seen.pose if seen else None
    return {
        "seen_at_position": [pose.x, pose.y] if pose else None,
        "position": list(truth[:2]),
        "position_error_m": pose.distance_to(*truth[:2]) if pose else None,
        "states_position": bool(places_in(answer.text)),
    }


def _count(flags: list | None) -> str:
    """``"k/n"`` of a list of booleans, "" when there is none."""
    return f"{sum(flags)}/{len(flags)}" if flags else ""


def _verdict_fields(a) -> dict:
    """What an answer's verdict rests on (JSON-ready): verdict, text source, the top sighting scores."""
    return {"verdict": a.verdict, "answer_source": a.answer_source, "scores": [x.score for x in a.sightings]}


def _mean(xs: list) -> float | None:
    return float(np.mean(xs)) if xs else None


def _median(xs: list) -> float | None:
    return float(np.median(xs)) if xs else None


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-bench-needle", description=__doc__.split("\n\n")[0])
    p.add_argument("--video", action="append", required=True, help="background video (repeatable)")
    p.add_argument(
        "--events",
        default=None,
        help="folder of event images named by label (default: photos bundled with scikit-image)",
    )
    p.add_argument("--minutes", type=_csv(float), default=[5.0, 20.0, 60.0], help="drive lengths")
    p.add_argument("--fps", type=float, default=1.0, help="sampled frames per second of drive")
    p.add_argument(
        "--policy",
        type=_csv(str),
        default=["full", "window", "streaming_llm", "h2o", "inf_mllm"],
        help=f"KV-cache policies, or {INDEX!r}: the retrieval baseline (every frame's label and time "
        "in an unbounded index, answered by the same rule and model)",
    )
    p.add_argument("--capacity", type=_csv(int), default=[1024], help="KV capacities (tokens)")
    p.add_argument("--beta", type=float, default=MEMORY_BETA, help="inf_mllm attention bias (logits per slot)")
    p.add_argument("--decay", type=float, default=MEMORY_DECAY, help="inf_mllm score carry per chunk")
    p.add_argument(
        "--vision-budget",
        type=int,
        default=MEMORY_VISION_BUDGET,
        help="vision tokens per row kept ahead of other saddles, for the policies that score slots (h2o, inf_mllm)",
    )
    p.add_argument(
        "--novelty-threshold",
        type=float,
        default=None,
        help="novelty gate in [0, 1] (0: every frame keeps its vision tokens and label; default: the family's)",
    )
    p.add_argument(
        "--familiar-interval",
        type=float,
        default=DEFAULT_FAMILIAR_INTERVAL_S,
        help="seconds between stored familiar frames (0: store every frame)",
    )
    p.add_argument(
        "--slack",
        type=int,
        default=DEFAULT_SLACK,
        help="lazy-eviction slack (tokens past the capacity before an eviction; 0: every overflow)",
    )
    p.add_argument("--seed", type=int, default=0, help="event-time seed")
    p.add_argument("--again", type=_csv(str), default=[], help="events shown a second time, at seeded times (e.g. cat)")
    p.add_argument(
        "--poses",
        action="store_true",
        help="stream a synthetic odometry track (20 Hz) beside the frames and score where each event was seen",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the model and KV cache (default cpu; "
        "cuda uses the project's CUDA kernels for scoring and compaction)",
    )
    p.add_argument("--json", required=True, help="output JSON (markdown and PNG beside it)")
    p.add_argument("--resume", action="store_true", help="skip runs already in --json")
    return p.parse_args(argv)


def merge_run(out: Path, header: dict, key: str | None = None, run: dict | None = None) -> dict:
    """Add ``run`` under ``key`` (if given) to the JSON at ``out`` (created with ``header`` if
    absent), score every run again (:func:`rescore`) and write it back, holding an exclusive
    lock on ``out``.lock; returns the merged document."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.is_file() else {**header, "runs": {}}
        if key is not None:
            data["runs"][key] = run
        for r in data["runs"].values():
            rescore(r)
        write_json(out, data)
        return data


def _accuracy(runs: list[dict], policy: str, minutes: float, capacity: int | None = None) -> float | None:
    hits = [
        r["accuracy"]
        for r in runs
        if r["policy"] == policy
        and r["minutes"] == minutes
        and (capacity is None or r["capacity"] == capacity)
        and r["accuracy"] is not None
    ]
    return max(hits) if hits else None


def rescore(run: dict) -> None:
    """Score ``run``'s stored answers again with the current scoring (in place), so one grid is
    scored one way whichever version answered: each event answer (:func:`score_answer`) and the
    run's absent-object, degeneration and hallucination counts."""
    from .drive import Event, score_answer, time_tolerance_s

    words = {e["label"]: tuple(e["words"]) for e in run["manifest"]["events"]}
    tolerance = time_tolerance_s(run["manifest"]["minutes"])
    for a in run["answers"]:
        a.update(
            score_answer(
                a["answer"], Event(a["label"], a["time_s"], words[a["label"]]), tolerance, seen_at_s=a.get("seen_at_s")
            )
        )  # runs from before sightings have none
    for metric, field in (
        ("accuracy", "correct"),
        ("named", "named"),
        ("recalled", "recalled"),
        ("text_timed", "timed"),
    ):
        run[metric] = _mean([a[field] for a in run["answers"]])
    run.update(run_scores(run["answers"], run.get("absent_answers", []), words))


def run_scores(answers: list[dict], absent: list[str], shown: dict[str, tuple[str, ...]]) -> dict:
    """A run's answer-level counts: ``absent_correct`` (fraction of absent-object answers that
    are a clear no), ``degenerate`` and ``hallucinated`` (answers, of all), ``time_error_s_median``
    (over event answers that state a time). ``shown``: the drive's events, label -> words."""
    from .drive import ABSENT_OBJECTS, names_unshown, repeats_ngram

    texts = [a["answer"] for a in answers] + absent
    vocabulary = {**shown, **{label: (label,) for label in ABSENT_OBJECTS}}
    return {
        "absent_correct": _mean([is_clear_no(t) for t in absent]),
        "degenerate": sum(repeats_ngram(t) for t in texts),
        "hallucinated": sum(names_unshown(t, vocabulary, set(shown)) for t in texts),
        "time_error_s_median": _median([a["time_error_s"] for a in answers if a["time_error_s"] is not None]),
    }


def report(data: dict, out: Path) -> None:
    """Write the markdown table (with the 80%-of-full-cache check) and the accuracy plot
    beside ``out`` (the JSON path)."""
    runs = sorted(data["runs"].values(), key=lambda r: (r["minutes"], r["capacity"], r["policy"]))
    rows = [
        [
            r["minutes"],
            r.get("config_seed", ""),
            r["policy"],
            r["capacity"],
            r.get("slack", 0),
            r.get("vision_budget", 0),
            r["accuracy"],
            r["named"],
            r["recalled"],
            r["text_timed"],
            r.get("absent_correct"),
            r.get("near_miss_correct"),
            _count(r.get("repeated_all_timed")),
            r.get("answers_from_evidence"),
            None if r.get("memory_bytes") is None else f"{r['memory_bytes'] / 2**20:.2f}",
            r.get("degenerate"),
            r.get("hallucinated"),
            r.get("time_error_s_median"),
            r.get("position_error_m_median"),
            r.get("positions_stated"),
            r["ingest_ms_median"],
            r["ingest_ms_p95"],
            r.get("stored_ms_median"),
            r["ttft_s_median"],
            r["decode_tokens_per_s_median"],
            r["overflow"] or "",
        ]
        for r in runs
    ]
    md = [
        "# Needle in the drive",
        "",
        describe(data["machine"]),
        "",
        "accuracy = the answer names the object AND its text states a time within +-10 s of the event "
        "(+-60 s on drives over 10 minutes); recalled = the cache's best sighting is that close (the "
        "cache's, not the answer's); text timed = the text states the time; absent correct = a clear "
        "no to a question about an object never shown; degenerate = answers repeating a 4-word "
        "sequence; hallucinated = answers naming a class never shown without denying it.",
        "",
        "slack = lazy-eviction slack (tokens past the capacity before an eviction; runs that predate it: 0); "
        "vision budget = vision tokens per row kept ahead of other saddles; stored ms = ingest of the "
        "frames written to the cache (the others cost the vision encoder only).",
        "",
        "near miss no = a clear no about an object like an event's but never shown (a dog for the cat); "
        "repeated = events shown twice whose answer states both times; from evidence = answers whose "
        "text contradicted their evidence and were replaced by it.",
        "",
        "position error = median over the named events of the distance between the best sighting's pose and "
        "where the event was shown on the odometry track (runs with --poses); position stated = answers whose "
        "text states a position.",
        "",
        markdown_table(
            [
                "minutes",
                "seed",
                "policy",
                "capacity",
                "slack",
                "vision budget",
                "accuracy",
                "named",
                "recalled",
                "text timed",
                "absent correct",
                "near miss no",
                "repeated",
                "from evidence",
                "memory MiB",
                "degenerate",
                "hallucinated",
                "time error s",
                "position error m",
                "position stated",
                "ingest ms median",
                "ingest ms p95",
                "stored ms median",
                "TTFT s",
                "decode tok/s",
                "note",
            ],
            rows,
        ),
    ]
    full5 = _accuracy(runs, "full", min((r["minutes"] for r in runs), default=0))
    longest = max((r["minutes"] for r in runs), default=0)
    for cap in sorted({r["capacity"] for r in runs if r["policy"] != "full"}):
        ours = _accuracy(runs, "inf_mllm", longest, cap)
        if ours is None:
            continue
        peers = {p: _accuracy(runs, p, longest, cap) for p in ("streaming_llm", "h2o")}
        line = f"- capacity {cap}, {longest:g} min: inf_mllm accuracy {ours:.2f}"
        if full5:
            line += f" = {ours / full5:.0%} of full cache at the shortest drive ({full5:.2f}; goal >= 80%)"
        elif full5 is not None:
            line += " (full cache at the shortest drive scored 0: the 80% goal has no baseline)"
        line += "".join(f"; {p} {a:.2f}" for p, a in peers.items() if a is not None)
        md.append(line)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")

    with png_figure(out.with_suffix(".png"), figsize=(6, 3.8)) as (_, ax):
        for policy, budget, cap in sorted({(r["policy"], r.get("vision_budget", 0), r["capacity"]) for r in runs}):
            pts = sorted(
                (r["minutes"], r["accuracy"])
                for r in runs
                if (r["policy"], r.get("vision_budget", 0), r["capacity"]) == (policy, budget, cap)
                and r["accuracy"] is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{policy}{f'+vb{budget}' if budget else ''}@{cap}")
        ax.set_xlabel("drive length (minutes)")
        ax.set_ylabel("accuracy (named and timed)")
        ax.set_ylim(-0.05, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def main(argv=None) -> int:
    """Console entry point; returns the exit code (2 on bad input)."""
    args = parse_args(argv)
    from ..models import load_model
    from ..runtime.session import open_session
    from .drive import Drive, OdometryTrack, bundled_events, events_from_dir, video_frames

    try:
        for policy in args.policy:  # the cache's own rules: a bad name, --beta, --decay or --vision-budget fails here
            if policy == INDEX:
                continue
            make_policy(
                policy,
                beta=args.beta,
                decay=args.decay,  # (a negative budget is refused for any policy)
                vision_budget=args.vision_budget if scores_slots(policy) else min(args.vision_budget, 0),
            )
        if args.slack < 0:
            raise ValueError(f"--slack must be >= 0 tokens, got {args.slack}")
        if args.novelty_threshold is not None and not 0 <= args.novelty_threshold <= 1:
            raise ValueError(f"--novelty-threshold must be in [0, 1], got {args.novelty_threshold}")
        if args.familiar_interval < 0:
            raise ValueError(f"--familiar-interval must be >= 0 seconds, got {args.familiar_interval}")
        check_device(args.device)
        videos = [video_frames(v, args.fps) for v in args.video]
        events = events_from_dir(args.events) if args.events else bundled_events()
    except (FileNotFoundError, ValueError) as exc:
        print(f"infmllm-bench-needle: error: {exc}", file=sys.stderr)
        return 2
    model = load_model("smollm2-135m", device=args.device)

    def background(t: float):
        return videos[int(t // 60) % len(videos)](t)  # switch clip every minute

    out = Path(args.json)
    done = set(json.loads(out.read_text())["runs"]) if args.resume and out.is_file() else set()
    header = {"machine": machine(), "config": {k: v for k, v in vars(args).items() if k != "resume"}}
    data = None
    for minutes in args.minutes:
        drive = Drive(background, minutes, args.fps, events, seed=args.seed, again=tuple(args.again))
        track = OdometryTrack(minutes * 60, 20.0, args.seed) if args.poses else None
        for cap in args.capacity:
            for policy in args.policy:
                # full: as large as the model's context allows, i.e. "full where memory allows".
                size = model.decoder.cfg.max_position_embeddings - 64 if policy == "full" else cap
                budget = args.vision_budget if policy != INDEX and scores_slots(policy) else 0
                slack = args.slack if policy != "full" else 0
                key = (
                    f"{policy}{f'+vb{budget}' if budget else ''}@{size},{minutes:g}min"
                    + (f",slack{slack}" if policy != "full" and slack != DEFAULT_SLACK else "")
                    + (f",seed{args.seed}" if args.seed else "")
                    + "".join(f",again-{label}" for label in args.again)
                    + (f",novelty{args.novelty_threshold:g}" if args.novelty_threshold is not None else "")
                    + (",poses" if args.poses else "")
                )
                if key in done:
                    continue
                print(f"[{key}]", file=sys.stderr, flush=True)
                if policy == INDEX:  # the retrieval baseline: its cache only holds the question
                    session = RetrievalSession(
                        model,
                        capacity=size,
                        policy="window",
                        recent=cap // 4,
                        familiar_interval_s=args.familiar_interval,
                        slack=slack,
                        novelty_threshold=args.novelty_threshold,
                    )
                else:
                    session = open_session(
                        model,
                        capacity=size,
                        policy=policy,
                        recent=cap // 4,
                        beta=args.beta,
                        decay=args.decay,
                        vision_budget=budget,
                        familiar_interval_s=args.familiar_interval,
                        slack=slack,
                        novelty_threshold=args.novelty_threshold,
                        track_positions=args.poses,
                    )
                data = merge_run(
                    out,
                    header,
                    key,
                    {
                        "policy": policy,
                        "capacity": size,
                        "minutes": minutes,
                        "config_seed": args.seed,
                        "again": args.again,
                        "vision_budget": budget,
                        "slack": slack,
                        "manifest": drive.manifest(),
                        "poses": args.poses,
                        **run_drive(session, drive, track=track),
                    },
                )
                report(data, out)
    if data is None and out.is_file():  # nothing left to run: score and report the grid again
        report(merge_run(out, header), out)
    if out.with_suffix(".md").is_file():
        print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
