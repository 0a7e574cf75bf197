"""``infmllm-demo`` (``make demo``): the whole product on one machine, as separate processes.

1. ``infmllm-make-bag``: a drive bag with the robot's odometry, from the real dashcam clip
   (``../shared/data`` when present, else the drawn road of :func:`synthetic_road`) with
   real-photo events at seeded times and places, the cat shown twice;
2. ``infmllm-node`` with the embedded model, ``config/desktop.yaml`` (plus overrides) and the bag's
   odometry as its pose topic;
3. ``infmllm-replay`` in keep-up mode, asking about every event after the drive, what was seen
   in its middle third, and six objects never shown;
4. SIGINT to the node; the answers and the report path are printed.

All traffic stays on loopback (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``, random domain).
Exit status: 0 when every step ran (the answers' correctness is in the report), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from ..ros.params import flatten_parameters
from .processes import ros_env, run_tool, start_node, stop_node

DASHCAM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dashcam_solidWhiteRight.mp4"
DESKTOP = Path(__file__).resolve().parents[2] / "config" / "desktop.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output folder (replaced)")
    p.add_argument("--minutes", type=float, default=5.0, help="drive length (default 5)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second in the bag (default 1)")
    p.add_argument("--video", help=f"background video (default {DASHCAM} when present; '' for the drawn road)")
    p.add_argument("--params", default=str(DESKTOP), help="node parameter YAML (default config/desktop.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a node parameter, YAML value (e.g. cache.capacity=512)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Console entry point."""
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = ros_env()
    if args.video is None:
        video = str(DASHCAM) if DASHCAM.is_file() else None
    else:
        video = args.video or None
    print(
        f"[1/4] drive bag: {args.minutes:g} min at {args.fps:g} fps, background "
        f"{video or 'drawn road (no ../shared/data here)'}",
        flush=True,
    )
    bag = out / "drive"
    made = run_tool(
        "infmllm-make-bag",
        [
            bag,
            "--minutes",
            args.minutes,
            "--fps",
            args.fps,
            "--seed",
            args.seed,
            "--again",
            "cat",
            *(["--video", video] if video else []),
        ],
        env,
    )
    print(made.stdout[-2000:], made.stderr[-2000:], sep="", flush=True)
    if made.returncode:
        return 1
    flat = flatten_parameters(yaml.safe_load(Path(args.params).read_text()))
    flat["pose_topic"] = flat.get("pose_topic") or "/odom"  # the bag's odometry: answers say where
    for item in args.set:
        name, _, value = item.partition("=")
        flat[name] = yaml.safe_load(value)
    print(f"[2/4] starting infmllm-node (ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}, loopback only) ...", flush=True)
    t0 = time.monotonic()
    try:
        node, log = start_node(out, env, flat)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"      node ready in {time.monotonic() - t0:.0f} s (log: {log})", flush=True)
    try:
        print("[3/4] replaying the bag and asking about each event ...", flush=True)
        report = out / "report.json"
        replay = run_tool("infmllm-replay", [bag, "--report", report], env, timeout_s=3 * 3600)
        print(replay.stdout[-6000:], replay.stderr[-3000:], sep="", flush=True)
    finally:
        status = stop_node(node)
        print(f"[4/4] node stopped with exit status {status}", flush=True)
    if replay.returncode or not report.is_file():
        return 1
    rep = json.loads(report.read_text())
    print(report.with_suffix(".md").read_text())
    events = [a for a in rep["answers"] if "correct" in a.get("score", {})]
    absent = [a for a in rep["answers"] if "absent_correct" in a.get("score", {})]
    print(
        f"events named with the right time (+-10 s): {sum(a['score']['correct'] for a in events)}/{len(events)}; "
        f"absent objects answered no: {sum(a['score']['absent_correct'] for a in absent)}/{len(absent)}; "
        f"degenerate answers: {rep['degenerate']}; repeated event with both times: {rep['repeated_all_timed']}; "
        f"time window listed: {rep['window_correct']}; answers from the model / replaced by their evidence: "
        f"{rep['answers_from_model']} / {rep['answers_from_evidence']}; median position error "
        f"{rep.get('position_error_m_median')} m, events without a position {rep.get('positions_unknown')}, "
        f"answers stating a position {rep.get('answers_stating_position')}; report: {report} "
        f"(and {report.with_suffix('.md')})"
    )
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
