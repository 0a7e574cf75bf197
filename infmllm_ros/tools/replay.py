"""``infmllm-replay BAG``: play a camera bag into a running ``infmllm-node``, ask scripted
questions at scripted bag times, and write a JSON + markdown report.

Pacing: ``--rate R`` plays at R x bag time (frames the node cannot keep up with are dropped by
the node, and counted); ``--keep-up`` (the default) publishes a frame only after the node has
reported the previous one on ``<node>/frames``, so a replay gives the same stream at any machine
speed. ``/clock`` carries bag time (start the node with ``use_sim_time:=true`` to run on it).
Questions are asked synchronously: playback pauses while the node answers. The node's last
``~/memory_image`` (what it still remembers) is saved beside the report as ``REPORT.memory.png``.

Messages are published as the bag's CDR bytes (no deserialisation); the header stamp that
pacing needs is read from the CDR directly (``std_msgs/Header`` is the first field of image
messages). Bags are read with ``rosbags`` (MCAP or SQLite3).
"""

from __future__ import annotations

import argparse
import importlib
import math
import struct
import sys
import threading
import time
from pathlib import Path
from statistics import median as _median

import cv2
import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from infmllm_interfaces.action import Ask as AskAction
from infmllm_interfaces.msg import Answer

from ..bench.common import describe, machine, markdown_table, write_json
from ..bench.drive import Event, repeats_ngram, score_answer, score_times, score_window
from ..ros.stamps import stamp_seconds, to_time
from ..runtime.answer import is_clear_no, places_in
from .ask import stream_ask


def cdr_header_stamp(data: bytes) -> float:
    """Seconds of the ``std_msgs/Header`` stamp that opens a CDR-serialised message.

    Raises:
        ValueError: fewer than 12 bytes.
    """
    if len(data) < 12:
        raise ValueError("message too short to hold a header")
    order = "<" if data[1] & 1 else ">"  # encapsulation kind: 0x0001 CDR_LE, 0x0000 CDR_BE
    sec, nanosec = struct.unpack_from(order + "iI", data, 4)
    return sec + nanosec * 1e-9


def load_questions(path: str | None) -> list[dict]:
    """Read a questions YAML (``questions: [{at_s, question, ...}]``), sorted by ``at_s``.

    Raises:
        ValueError: missing list, an entry without a non-empty ``question`` or a numeric ``at_s``.
    """
    if path is None:
        return []
    data = yaml.safe_load(Path(path).read_text()) or {}
    items = data.get("questions")
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a top-level 'questions:' list")
    for i, q in enumerate(items):
        if not isinstance(q, dict) or not str(q.get("question", "")).strip():
            raise ValueError(f"{path}: question {i} has no 'question' text")
        if not isinstance(q.get("at_s"), (int, float)):
            raise ValueError(f"{path}: question {i} needs a numeric 'at_s' (seconds from bag start)")
    return sorted(items, key=lambda q: q["at_s"])


#: Pose message types a bag's pose topics are published with (the node's pose_msg_type).
POSE_MSGTYPES = ("nav_msgs/msg/Odometry", "geometry_msgs/msg/PoseStamped")


def message_class(msgtype: str):
    """``sensor_msgs/msg/Image`` -> the rclpy message class."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


class Replayer:
    """The replay node's state: publishers, frame acknowledgements and diagnostics samples."""

    def __init__(self, node, node_name: str, topics: dict[str, str], pose_topics: dict[str, str] | None = None):
        self.node = node
        # Reliable publishers match both best-effort and reliable camera subscriptions.
        self.pubs = {
            t: node.create_publisher(message_class(m), t, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
            for t, m in {**topics, **(pose_topics or {})}.items()
        }
        self.image_topics = set(topics)
        self.clock = node.create_publisher(
            Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        )
        self.acks: dict[float, str] = {}
        self.outcomes: dict[str, int] = {}
        self.diagnostics: list[dict] = []
        self._cond = threading.Condition()
        node.create_subscription(Header, f"{node_name}/frames", self._on_frame, 1000)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.answers: list[Answer] = []
        node.create_subscription(Answer, f"{node_name}/answers", self.answers.append, 10)
        self.memory_image = None  # the newest ~/memory_image (sensor_msgs/Image)
        node.create_subscription(Image, f"{node_name}/memory_image", self._on_memory_image, 1)
        self.bag_time_s = 0.0
        self.phase = "stream"  # "questions" once playback has ended

    def _on_frame(self, msg: Header) -> None:
        outcome = msg.frame_id.rpartition(":")[2]
        with self._cond:
            self.acks[round(stamp_seconds(msg.stamp), 6)] = outcome
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self._cond.notify_all()

    def _on_memory_image(self, msg: Image) -> None:
        self.memory_image = msg

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": stream"):
                values = {kv.key: kv.value for kv in status.values}
                self.diagnostics.append(
                    {"bag_time_s": self.bag_time_s, "phase": self.phase, "wall_s": time.time(), **values}
                )

    def wait_ack(self, stamp: float, timeout_s: float) -> str | None:
        """Wait until the node reports the frame stamped ``stamp``; its outcome or None."""
        key = round(stamp, 6)
        with self._cond:
            self._cond.wait_for(lambda: key in self.acks, timeout_s)
            return self.acks.pop(key, None)

    def wait_subscribers(self, timeout_s: float) -> bool:
        """True once every image publisher is matched by a subscription (a pose topic need not be:
        the node may watch none)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.get_subscription_count() > 0 for t, p in self.pubs.items() if t in self.image_topics):
                return True
            time.sleep(0.1)
        return False


def ask_scripted(node, service: str, q: dict, timeout_s: float, origin_s: float | None, client=None) -> dict:
    """Ask one scripted question through the ``ask`` action (the answer streams); the record for
    the report (with a score when it has expectations): ``ttft_s`` is the time from sending the
    goal to the first streamed token, ``latency_s`` the node's whole-answer latency (what the
    ``/ask`` service takes).

    ``origin_s``: header stamp (seconds) of the first frame published, against which sightings
    are compared with the question's ``expect_time_s`` (None before any frame). ``client``: an
    ``ActionClient`` for ``service`` kept across questions (:func:`~.ask.stream_ask`).
    """
    t0 = time.monotonic()
    first = []
    result = stream_ask(
        node,
        service,
        q["question"],
        int(q.get("max_new_tokens", 0)),
        bool(q.get("keep_in_context", False)),
        timeout_s,
        on_feedback=lambda f: first or first.append(time.monotonic() - t0),
        client=client,
    )
    rec = {
        "at_s": q["at_s"],
        "question": q["question"],
        "label": q.get("label"),
        "expect_time_s": q.get("expect_time_s"),
    }
    if result is None:
        return {
            **rec,
            "success": False,
            "message": f"no answer within {timeout_s:.0f} s",
            "latency_s": time.monotonic() - t0,
        }
    response = result.answer
    rec.update(
        success=result.success,
        answer=response.answer,
        message=result.message,
        latency_s=response.latency_s,
        ttft_s=first[0] if first else None,
        frames_in_context=response.frames_in_context,
        tokens_in_cache=response.tokens_in_cache,
        seen=response.seen,
        confidence=response.confidence,
        verdict=response.verdict,
        answer_source=response.answer_source,
        evidence=response.evidence,
        seen_at_s=[stamp_seconds(t) - origin_s for t in response.sighting_stamps] if origin_s is not None else [],
        seen_at_position=[
            [p.position.x, p.position.y] if known else None
            for p, known in zip(response.sighting_poses, response.sighting_pose_known)
        ],
        pose_frame_id=response.pose_frame_id,
    )
    if q.get("expect_positions"):  # the best sighting against the nearest place the event was shown
        where = (rec["seen_at_position"] or [None])[0]
        rec["position_error_m"] = (
            None if where is None else min(math.hypot(where[0] - x, where[1] - y) for x, y in q["expect_positions"])
        )
        rec["states_position"] = bool(places_in(response.answer)) if result.success else False
    if result.success and q.get("absent"):
        rec["score"] = {"absent_correct": is_clear_no(response.answer), "degenerate": repeats_ngram(response.answer)}
    elif result.success and q.get("expect_words"):
        event = Event(q.get("label", ""), float(q.get("expect_time_s", math.nan)), tuple(q["expect_words"]))
        rec["score"] = score_answer(response.answer, event, seen_at_s=(rec["seen_at_s"] or [None])[0])
        if q.get("expect_times_s"):
            rec["score"]["repeated"] = score_times(response.answer, q["expect_times_s"])
    elif result.success and "window_s" in q:
        rec["score"] = {
            "window": score_window(response.answer, q.get("expect_words_by_label") or {}),
            "degenerate": repeats_ngram(response.answer),
        }
    return rec


def median(xs: list) -> float | None:
    """Median of ``xs``, None when empty."""
    return _median(xs) if xs else None


def rss_growth(diagnostics: list[dict], start_s: float = 600.0, end_s: float = 3600.0) -> dict:
    """Node RSS while streaming, at bag minute 10 (or the first sample) and at the last streaming
    sample (<= minute 60), and the most it reached including the final questions; from
    ``/diagnostics`` samples."""
    every = [float(d["rss_mib"]) for d in diagnostics if "rss_mib" in d]
    samples = [
        (d["bag_time_s"], float(d["rss_mib"])) for d in diagnostics if "rss_mib" in d and d.get("phase") == "stream"
    ]
    if not samples:
        return {}
    after = [s for s in samples if s[0] >= start_s] or samples
    first = after[0]
    last = [s for s in samples if s[0] <= end_s][-1]
    return {
        "rss_mib_first": first[1],
        "rss_mib_first_at_s": first[0],
        "rss_mib_last": last[1],
        "rss_mib_last_at_s": last[0],
        "rss_growth": last[1] / first[1] - 1.0,
        "rss_mib_max": max(every),
        "rss_mib_after_questions": every[-1],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-replay", description=__doc__.splitlines()[0])
    p.add_argument("bag", help="rosbag2 directory (MCAP or SQLite3)")
    p.add_argument("--questions", help="questions YAML (default: BAG.questions.yaml when present)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="play at RATE x bag time instead of keeping up with the node")
    pace.add_argument("--keep-up", action="store_true", help="wait for the node after each frame (default)")
    p.add_argument("--node", default="/infmllm", help="node name, for <node>/frames (default /infmllm)")
    p.add_argument("--service", default="/ask")
    p.add_argument("--remap", action="append", default=[], help="FROM:=TO bag topic -> published topic")
    p.add_argument("--wait-node", type=float, default=180.0, help="seconds to wait for the node (default 180)")
    p.add_argument("--frame-timeout", type=float, default=120.0, help="keep-up: seconds to wait per frame")
    p.add_argument("--ask-timeout", type=float, default=300.0)
    p.add_argument("--report", default="replay-report.json", help="report JSON (markdown beside it)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Console entry point: 0 when the replay ran (answers may still be wrong; see the report),
    1 when the node never appeared, 2 on bad input."""
    from rosbags.highlevel import AnyReader

    args = parse_args(argv)
    bag = Path(args.bag)
    qpath = args.questions or (f"{bag}.questions.yaml" if Path(f"{bag}.questions.yaml").is_file() else None)
    try:
        remap = dict(r.split(":=", 1) for r in args.remap)
        questions = load_questions(qpath)
        reader = AnyReader([bag])
        reader.open()
    except Exception as exc:  # rosbags raises its own errors for unreadable bags
        print(f"infmllm-replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    images = [c for c in reader.connections if c.msgtype.startswith("sensor_msgs/msg/")]
    poses = [c for c in reader.connections if c.msgtype in POSE_MSGTYPES]
    if not images:
        print(f"infmllm-replay: {bag} has no sensor_msgs topics", file=sys.stderr)
        return 2
    rclpy.init()
    node = rclpy.create_node("infmllm_replay")
    player = Replayer(
        node,
        args.node,
        {remap.get(c.topic, c.topic): c.msgtype for c in images},
        {remap.get(c.topic, c.topic): c.msgtype for c in poses},
    )
    # one client for every question, made now: it is discovered while the node starts and streams
    asker = ActionClient(node, AskAction, args.service)
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    report = {
        "machine": machine(),
        "bag": str(bag),
        "questions_file": qpath,
        "pacing": f"rate {args.rate}" if args.rate else "keep-up",
        "answers": [],
    }
    try:
        print(f"waiting up to {args.wait_node:.0f} s for the node ...", flush=True)
        if not player.wait_subscribers(args.wait_node):
            print("infmllm-replay: no subscriber on the bag's topics: is infmllm-node running?", file=sys.stderr)
            return 1
        start_ns, pending, published, unacked = reader.start_time, list(questions), 0, 0
        origin_s = None  # the first frame's header stamp
        total = sum(c.msgcount for c in images)
        t_wall0 = time.monotonic()
        for connection, timestamp, data in reader.messages(connections=images + poses):
            t = (timestamp - start_ns) * 1e-9
            if connection in poses:  # the robot's pose: published as it comes, no acknowledgement
                player.pubs[remap.get(connection.topic, connection.topic)].publish(bytes(data))
                continue
            while pending and pending[0]["at_s"] <= t:
                report["answers"].append(
                    ask_scripted(node, args.service, pending.pop(0), args.ask_timeout, origin_s, asker)
                )
                print(f"  [{t:7.1f} s] {report['answers'][-1]}", flush=True)
            if args.rate:
                delay = t_wall0 + t / args.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            player.bag_time_s = t
            player.clock.publish(Clock(clock=to_time(timestamp * 1e-9)))
            player.pubs[remap.get(connection.topic, connection.topic)].publish(bytes(data))
            if origin_s is None:
                origin_s = cdr_header_stamp(data)
            published += 1
            if not args.rate and player.wait_ack(cdr_header_stamp(data), args.frame_timeout) is None:
                unacked += 1
            if published % max(1, total // 20) == 0:
                print(f"  {published}/{total} frames, bag {t:.0f} s, node: {player.outcomes}", flush=True)
        end_t = (reader.end_time - start_ns) * 1e-9
        player.phase = "questions"
        if args.rate:  # let the node finish the frames in flight before asking
            time.sleep(min(30.0, 5.0 / args.rate))
        for q in pending:
            report["answers"].append(ask_scripted(node, args.service, q, args.ask_timeout, origin_s, asker))
            print(f"  [end] {report['answers'][-1]}", flush=True)
        time.sleep(1.5)  # one more /diagnostics sample after the answers
        scores = [a["score"] for a in report["answers"] if "score" in a]
        present = [x for x in scores if "correct" in x]
        absent = [x["absent_correct"] for x in scores if "absent_correct" in x]
        report.update(
            answers_published=len(player.answers),
            frames_published=published,
            frames_unacked=unacked,
            bag_duration_s=end_t,
            wall_s=time.monotonic() - t_wall0,
            node_outcomes=dict(player.outcomes),
            accuracy=sum(x["correct"] for x in present) / len(present) if present else None,
            named=sum(x["named"] for x in present),
            absent_correct=sum(absent) / len(absent) if absent else None,
            degenerate=sum(x["degenerate"] for x in scores),
            repeated_all_timed=[x["repeated"]["all_timed"] for x in present if "repeated" in x],
            window_correct=[x["window"]["correct"] for x in scores if "window" in x],
            answers_from_evidence=sum(a.get("answer_source") == "evidence" for a in report["answers"]),
            answers_from_model=sum(a.get("answer_source") == "model" for a in report["answers"]),
            position_error_m_median=median(
                [a["position_error_m"] for a in report["answers"] if a.get("position_error_m") is not None]
            ),
            positions_unknown=sum("position_error_m" in a and a["position_error_m"] is None for a in report["answers"]),
            answers_stating_position=sum(a.get("states_position", False) for a in report["answers"]),
            ttft_s_median=median([a["ttft_s"] for a in report["answers"] if a.get("ttft_s") is not None]),
            latency_s_median=median([a["latency_s"] for a in report["answers"] if a.get("success")]),
            memory=rss_growth(player.diagnostics),
            diagnostics_last=player.diagnostics[-1:] or None,
            diagnostics=player.diagnostics,
        )
        write_report(report, Path(args.report))
        if player.memory_image is not None:  # what the node still remembered after the drive
            m = player.memory_image
            rgb = np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.width, 3)
            cv2.imwrite(str(Path(args.report).with_suffix(".memory.png")), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        print(
            f"report: {args.report} (accuracy {report['accuracy']}, absent correct {report['absent_correct']}, "
            f"degenerate {report['degenerate']}, outcomes {player.outcomes})"
        )
    finally:
        reader.close()
        executor.shutdown()
        spinner.join(5.0)
        asker.destroy()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


def write_report(report: dict, path: Path) -> None:
    """Write ``path`` (JSON) and ``path`` with ``.md`` (answers table + figures)."""
    write_json(path, report)

    def yes(key: str, a: dict) -> str:
        score = a.get("score", {})
        return "" if key not in score else "yes" if score[key] else "no"

    rows = [
        [
            f"{a['at_s']:.0f}",
            a["question"],
            (a.get("answer") or a.get("message", "")).replace("|", "/"),
            f"{a.get('verdict') or ('seen' if a.get('seen') else 'not seen')} ({a.get('confidence', 0.0):.2f})",
            a.get("answer_source", ""),
            (f"{a['seen_at_s'][0]:.0f}" if a.get("seen_at_s") else "")
            + (f" / {a['expect_time_s']:.0f}" if a.get("expect_time_s") is not None else ""),
            ""
            if "position_error_m" not in a
            else "unknown"
            if a["position_error_m"] is None
            else f"{a['position_error_m']:.1f}",
            yes("named", a),
            yes("correct", a),
            yes("absent_correct", a),
            yes("degenerate", a),
            "" if a.get("ttft_s") is None else f"{a['ttft_s']:.2f}",
            f"{a['latency_s']:.2f}",
        ]
        for a in report["answers"]
    ]
    mem = report.get("memory") or {}
    lines = [
        f"# Replay of {report['bag']}",
        "",
        describe(report["machine"]),
        "",
        f"Pacing {report['pacing']}; {report['frames_published']} frames published in {report['wall_s']:.0f} s "
        f"for {report['bag_duration_s']:.0f} s of bag; node outcomes {report['node_outcomes']}; "
        f"unacknowledged {report['frames_unacked']}.",
        "",
    ]
    if mem:
        lines += [
            f"Node RSS while streaming {mem['rss_mib_first']:.0f} MiB at {mem['rss_mib_first_at_s']:.0f} s -> "
            f"{mem['rss_mib_last']:.0f} MiB at {mem['rss_mib_last_at_s']:.0f} s "
            f"(growth {mem['rss_growth']:+.1%}); {mem['rss_mib_after_questions']:.0f} MiB after the "
            f"questions, max {mem['rss_mib_max']:.0f} MiB.",
            "",
        ]
    lines.append(
        f"Events answered with name and time (+-10 s): {report.get('accuracy')}; absent objects answered "
        f"no: {report.get('absent_correct')}; degenerate answers: {report.get('degenerate')}; "
        f"repeated events with every time stated: {report.get('repeated_all_timed')}; time-window "
        f"answers naming every event in the window: {report.get('window_correct')}."
    )
    lines.append(
        f"Answer text from the model: {report.get('answers_from_model')}; replaced by the evidence sentence "
        f"because the model's text contradicted it: {report.get('answers_from_evidence')}."
    )
    if report.get("position_error_m_median") is not None or report.get("positions_unknown"):
        lines.append(
            f"Where: median position error {report.get('position_error_m_median') or 0:.1f} m over the events "
            f"(best sighting's pose against where the event was shown); events without a known position: "
            f"{report.get('positions_unknown')}; answers stating a position: "
            f"{report.get('answers_stating_position')}."
        )
    if report.get("ttft_s_median") is not None:
        lines.append(
            f"First streamed token (ask action) after {report['ttft_s_median']:.2f} s, whole answer "
            f"{report['latency_s_median']:.2f} s (medians over the questions)."
        )
    lines.append("")
    lines.append(
        markdown_table(
            [
                "bag s",
                "question",
                "answer",
                "verdict (confidence)",
                "text from",
                "sighting s / truth s",
                "position error m",
                "named",
                "named+time",
                "absent: no",
                "degenerate",
                "first token s",
                "latency s",
            ],
            rows,
        )
    )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
