"""``infmllm-make-bag``: a drive as a rosbag2 (video and/or still images, real-photo events at
known times and places), plus a manifest and the questions to ask about it.

Writes with ``rosbags`` (no ROS install needed), MCAP or SQLite3 storage, one camera topic of
``sensor_msgs/CompressedImage`` (JPEG) or ``sensor_msgs/Image`` (rgb8/bgr8/mono8), and the
robot's odometry (``nav_msgs/Odometry`` on ``--odom-topic`` at ``--odom-rate`` Hz, frame ``odom``:
a smooth synthetic path at 1-10 m/s, :class:`~infmllm_ros.bench.drive.OdometryTrack`), interleaved
by time. Header stamps and bag times are ``--start-stamp`` + drive time, so a replay is
reproducible. Beside the bag directory ``OUT``: ``OUT.manifest.json`` (events, times, places,
words, bag figures) and ``OUT.questions.yaml`` (the :mod:`infmllm_ros.tools.replay` script: one
question per event, asked after the last frame, with where it was shown).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import yaml

from ..bench.drive import (
    ABSENT_OBJECTS,
    Drive,
    LoopedClip,
    OdometryTrack,
    absent_question,
    bundled_events,
    events_from_dir,
    synthetic_road,
    video_frames,
    window_minutes,
)

TYPESTORE_NAME = "ros2_kilted"
DEFAULT_START_STAMP = 1_700_000_000.0  # a fixed epoch: bags made twice are identical


def typestore():
    """The rosbags typestore for ROS 2 Kilted message definitions."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores(TYPESTORE_NAME))


def image_message(
    store, rgb: np.ndarray, stamp_s: float, frame_id: str, fmt: str, encoding: str = "rgb8", jpeg_quality: int = 85
):
    """Build a rosbags ``sensor_msgs`` message for ``rgb`` (uint8 ``[H, W, 3]``).

    Args:
        fmt: ``compressed`` (JPEG ``CompressedImage``) or ``raw`` (``Image`` in ``encoding``).
        encoding: raw encoding, ``rgb8``, ``bgr8`` or ``mono8``.

    Returns:
        ``(message, msgtype)``.

    Raises:
        ValueError: unknown format or encoding.
    """
    types = store.types
    sec = int(stamp_s)
    header = types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((stamp_s - sec) * 1e9))),
        frame_id=frame_id,
    )
    if fmt == "compressed":
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        msgtype = "sensor_msgs/msg/CompressedImage"
        return types[msgtype](header=header, format="jpeg", data=jpeg.reshape(-1)), msgtype
    if fmt != "raw":
        raise ValueError(f"unknown format {fmt!r} (compressed or raw)")
    conversions = {"rgb8": None, "bgr8": cv2.COLOR_RGB2BGR, "mono8": cv2.COLOR_RGB2GRAY}
    if encoding not in conversions:
        raise ValueError(f"unknown raw encoding {encoding!r} ({', '.join(conversions)})")
    pixels = rgb if conversions[encoding] is None else cv2.cvtColor(rgb, conversions[encoding])
    pixels = np.ascontiguousarray(pixels)
    step = pixels.shape[1] * (1 if pixels.ndim == 2 else 3)
    msgtype = "sensor_msgs/msg/Image"
    return types[msgtype](
        header=header,
        height=pixels.shape[0],
        width=pixels.shape[1],
        encoding=encoding,
        is_bigendian=0,
        step=step,
        data=pixels.reshape(-1),
    ), msgtype


def odometry_message(store, t_s: float, x: float, y: float, yaw: float, frame_id: str = "odom"):
    """A rosbags ``nav_msgs/Odometry`` at ``t_s`` (header stamp): planar pose ``(x, y)`` metres,
    heading ``yaw`` radians (quaternion about z), zero twist and covariances."""
    types = store.types
    sec = int(t_s)
    header = types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=int(round((t_s - sec) * 1e9))), frame_id=frame_id
    )
    pose = types["geometry_msgs/msg/Pose"](
        position=types["geometry_msgs/msg/Point"](x=x, y=y, z=0.0),
        orientation=types["geometry_msgs/msg/Quaternion"](
            x=0.0, y=0.0, z=float(np.sin(yaw / 2)), w=float(np.cos(yaw / 2))
        ),
    )
    vector = types["geometry_msgs/msg/Vector3"]
    return types["nav_msgs/msg/Odometry"](
        header=header,
        child_frame_id="base_link",
        pose=types["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=types["geometry_msgs/msg/TwistWithCovariance"](
            twist=types["geometry_msgs/msg/Twist"](
                linear=vector(x=0.0, y=0.0, z=0.0), angular=vector(x=0.0, y=0.0, z=0.0)
            ),
            covariance=np.zeros(36),
        ),
    )


def background_source(
    videos: list[str], images: list[str], fps: float, image_hold_s: float
) -> Callable[[float], np.ndarray]:
    """t (seconds) -> RGB background: the videos one after another and each still image held
    ``image_hold_s`` seconds, looped; the drawn :func:`synthetic_road` when both lists are empty.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable video or image.
    """
    if not videos and not images:
        return synthetic_road
    frames: list[np.ndarray] = []
    for v in videos:
        frames.extend(video_frames(v, fps).frames)
    for path in images:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {path}")
        frames.extend([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)] * max(1, int(round(image_hold_s * fps))))
    return LoopedClip(frames, fps)


def write_bag(
    out: Path,
    drive: Drive,
    topic: str,
    fmt: str,
    encoding: str,
    storage: str,
    size: tuple[int, int],
    start_stamp: float,
    frame_id: str = "camera_front",
    progress: Callable[[str], None] = print,
    track: OdometryTrack | None = None,
    odom_topic: str = "/odom",
) -> dict:
    """Write every frame of ``drive`` to a new rosbag2 at ``out`` (which must not exist).

    Args:
        size: ``(width, height)`` of the written frames (OpenCV area resize).
        storage: ``mcap`` or ``sqlite3``.
        track: the robot's odometry, written on ``odom_topic`` between the frames (None: none).

    Returns:
        dict of bag figures: frames, duration_s, bytes, topic, msgtype, start_stamp.

    Raises:
        FileExistsError: ``out`` exists. ValueError: unknown storage, format or encoding.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugins = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
    if storage not in plugins:
        raise ValueError(f"unknown storage {storage!r} (mcap or sqlite3)")
    if out.exists():
        raise FileExistsError(f"{out} exists; rosbag2 writers need a new directory")
    store = typestore()
    n = drive.n_frames
    odometry = iter(track.samples()) if track is not None else iter(())
    pending = next(odometry, None)
    with Writer(out, version=9, storage_plugin=plugins[storage]) as writer:
        connection = None
        odom = writer.add_connection(odom_topic, "nav_msgs/msg/Odometry", typestore=store) if track else None

        def write_odometry(until_s: float) -> None:
            nonlocal pending
            while pending is not None and pending[0] <= until_s:
                t_odom = start_stamp + pending[0]
                writer.write(
                    odom,
                    int(round(t_odom * 1e9)),
                    store.serialize_cdr(odometry_message(store, t_odom, *pending[1:]), "nav_msgs/msg/Odometry"),
                )
                pending = next(odometry, None)

        for i, (t, rgb, label) in enumerate(drive.frames()):
            write_odometry(t)
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if rgb.shape[1::-1] != size else rgb
            msg, msgtype = image_message(store, rgb, start_stamp + t, frame_id, fmt, encoding)
            if connection is None:
                connection = writer.add_connection(topic, msgtype, typestore=store)
            writer.write(connection, int(round((start_stamp + t) * 1e9)), store.serialize_cdr(msg, msgtype))
            if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
                progress(
                    f"  {i + 1}/{n} frames ({(i + 1) / n:.0%})" + (f", event {label} at {t:.0f} s" if label else "")
                )
        write_odometry(n / drive.fps)
    return {
        "frames": n,
        "duration_s": n / drive.fps,
        "topic": topic,
        "msgtype": msgtype,
        "storage": storage,
        "start_stamp": start_stamp,
        "bytes": sum(f.stat().st_size for f in out.iterdir()),
        **({"odom_topic": odom_topic, "odom_rate_hz": track.rate_hz} if track else {}),
    }


def questions_for(drive: Drive, track: OdometryTrack | None = None) -> list[dict]:
    """One scripted question per event label (a label shown twice expects both times,
    ``expect_times_s``; with a ``track``, where it was shown, ``expect_positions``), one
    about what was seen in the drive's middle third (``window_s``, with the events shown in it),
    then one per object never shown (:data:`ABSENT_OBJECTS`, ``absent: true``), all asked after
    the last frame (bag seconds from its start)."""
    end = drive.n_frames / drive.fps
    times: dict[str, list[float]] = {}
    for e in drive.schedule:
        times.setdefault(e.label, []).append(e.time_s)
    questions = []
    for label, ts in times.items():
        e = next(x for x in drive.schedule if x.label == label)
        questions.append(
            {
                "at_s": end,
                "question": e.question,
                "expect_words": list(e.words),
                "expect_time_s": ts[0],
                "label": label,
                **({"expect_times_s": ts} if len(ts) > 1 else {}),
                **({"expect_positions": [list(track.at(t)[:2]) for t in ts]} if track else {}),
            }
        )
    a, b = window_minutes(drive.minutes)
    inside = {e.label: list(e.words) for e in drive.schedule if 60 * a <= e.time_s <= 60 * b}
    questions.append(
        {
            "at_s": end,
            "question": f"What did you see between minute {a} and minute {b}?",
            "window_s": [60.0 * a, 60.0 * b],
            "expect_words_by_label": inside,
        }
    )
    return questions + [
        {"at_s": end, "question": absent_question(label), "label": label, "absent": True}
        for label in ABSENT_OBJECTS
        if label not in drive.events
    ]


def _event_time(text: str) -> tuple[str, float]:
    label, _, t = text.rpartition("@")
    try:
        return label, float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"event {text!r}: expected LABEL@SECONDS, e.g. cat@120") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="infmllm-make-bag", description=__doc__.splitlines()[0])
    p.add_argument("out", help="bag directory to create")
    p.add_argument("--video", action="append", default=[], help="background video (repeatable)")
    p.add_argument("--image", action="append", default=[], help="background still image (repeatable)")
    p.add_argument("--image-hold", type=float, default=10.0, help="seconds each still is shown (default 10)")
    p.add_argument("--events", help="folder of event images named by label (default: scikit-image photos)")
    p.add_argument(
        "--event",
        action="append",
        type=_event_time,
        default=[],
        help="LABEL@SECONDS: place an event by hand (repeatable; default: seeded times)",
    )
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--fps", type=float, default=1.0, help="frames per second in the bag (default 1)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--format", choices=("compressed", "raw"), default="compressed")
    p.add_argument("--encoding", choices=("rgb8", "bgr8", "mono8"), default="rgb8", help="raw encoding")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--topic", default="/camera/front/image_raw/compressed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--again",
        action="append",
        default=[],
        metavar="LABEL",
        help="show this event a second time, at a seeded time (repeatable)",
    )
    p.add_argument("--start-stamp", type=float, default=DEFAULT_START_STAMP, help="header stamp of the first frame (s)")
    p.add_argument("--odom-topic", default="/odom", help="nav_msgs/Odometry topic of the synthetic track")
    p.add_argument("--odom-rate", type=float, default=20.0, help="odometry messages per second (0: no odometry)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Console entry point; exit 2 on bad input (named), 0 when the bag is written."""
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if args.width < 8 or args.height < 8:
            raise ValueError(f"frame size {args.width}x{args.height} is too small (min 8x8)")
        events = events_from_dir(args.events) if args.events else bundled_events()
        at = dict(args.event) if args.event else None
        background = background_source(args.video, args.image, args.fps, args.image_hold)
        drive = Drive(background, args.minutes, args.fps, events, seed=args.seed, at=at, again=tuple(args.again))
        if args.odom_rate < 0:
            raise ValueError(f"--odom-rate must be >= 0 Hz, got {args.odom_rate}")
        track = OdometryTrack(args.minutes * 60, args.odom_rate, args.seed) if args.odom_rate > 0 else None
        print(
            f"writing {drive.n_frames} frames ({args.minutes:g} min at {args.fps:g} fps) to {out}"
            + (f", odometry at {args.odom_rate:g} Hz on {args.odom_topic}" if track else "")
        )
        info = write_bag(
            out,
            drive,
            args.topic,
            args.format,
            args.encoding,
            args.storage,
            (args.width, args.height),
            args.start_stamp,
            track=track,
            odom_topic=args.odom_topic,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"infmllm-make-bag: {exc}", file=sys.stderr)
        return 2
    manifest = {
        **drive.manifest(),
        "bag": {**info, "path": str(out)},
        "background": {"videos": args.video, "images": args.image},
    }
    if track is not None:
        for e in manifest["events"]:
            e["position"] = list(track.at(e["time_s"])[:2])
    Path(f"{out}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    Path(f"{out}.questions.yaml").write_text(
        yaml.safe_dump({"questions": questions_for(drive, track)}, sort_keys=False)
    )
    print(f"wrote {out} ({info['bytes'] / 2**20:.1f} MiB), {out}.manifest.json, {out}.questions.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
