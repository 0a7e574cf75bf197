"""``infmllm-bench-limits``: the node's limits as shipped, over real DDS on loopback.

One node process with ``config/desktop.yaml`` as shipped (best-effort, keep-last 1 camera QoS,
the loopback Fast DDS profile of :func:`~infmllm_ros.tools.processes.ros_env`), two cameras: a
front camera (JPEG) and a rear camera (raw ``sensor_msgs/Image``), each from its own publisher
process with the default (reliable) publisher QoS camera drivers use. It measures:

1. **Raw 4K frames**: rgb8 and bgra8 3840x2160 frames (23.7 and 31.6 MiB) on the rear camera, one
   at a time: how many arrive and are ingested.
2. **An oversized raw frame** (8000x8000 rgb8, 183 MiB, over ``max_frame_pixels``): its outcome,
   and the node's resident memory before and after (private and shared-memory pages apart: the
   shared-memory transport maps the publisher's segment into the node).
3. **A flood**: the rear camera sends 8x8 frames at ``--flood-hz`` for ``--flood-s`` seconds while
   the front camera sends one frame a second and an operator asks a question every two seconds:
   answer latency against the same questions asked idle, front frames ingested, rear frames read
   and replaced unread (``/diagnostics``), and the node's CPU time per rear frame not ingested.
4. **Odometry** (``nav_msgs/Odometry`` on :data:`POSES`, the node's ``pose_topic``) from its own
   process at ``--pose-hz`` for ``--pose-s`` seconds: poses the node received and its CPU time
   per pose.

Writes JSON and a markdown table (machine, date, command). Results: bench/results/README.md,
"Limits as shipped".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from .common import describe, machine, markdown_table, write_report

ROOT = Path(__file__).resolve().parents[2]
FRONT, REAR, POSES = "/limits/front/image_raw/compressed", "/limits/rear/image_raw", "/limits/odom"
T0 = 1_700_000_000
QUESTION = "Was there a cat?"


def shipped_parameters(path: Path = ROOT / "config" / "desktop.yaml") -> dict:
    """The node's parameters from a shipped YAML file, cameras replaced by :data:`FRONT` (JPEG)
    and :data:`REAR` (raw), odometry on :data:`POSES`; QoS, rates and limits as shipped."""
    from ..ros.params import flatten_parameters

    params = flatten_parameters(yaml.safe_load(path.read_text()))
    params.update(
        {
            "camera_topics": [FRONT, REAR],
            "camera_transports": ["compressed", "raw"],
            "camera_names": ["front", "rear"],
            "pose_topic": POSES,
            "pose_msg_type": "odometry",
            "diagnostics_period_s": 0.5,
        }
    )
    return params


def publish(topic: str, frames: str, hz: float, seconds: float) -> None:
    """Publisher process: ``frames`` ``tiny`` (8x8 rgb8 at ``hz`` for ``seconds``), ``odometry``
    (``nav_msgs/Odometry`` at ``hz`` for ``seconds``), or ``4k`` / ``oversized``
    (one raw frame each time a line arrives on stdin, stamped by the line's number; ``4k``
    alternates rgb8 and bgra8). Default publisher QoS (reliable, depth 10). Prints
    ``shared memory <status>`` first (:func:`~infmllm_ros.ros.shared_memory.transport_status`),
    then ``published I`` for each raw frame and ``sent N`` at the end."""
    import rclpy
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from ..ros.shared_memory import transport_status

    rclpy.init()
    node = rclpy.create_node("limits_publisher")
    print(f"shared memory {transport_status()}", flush=True)
    if frames == "odometry":
        from nav_msgs.msg import Odometry

        msg = Odometry(header=Header(frame_id="odom"))
        msg.pose.pose.orientation.w = 1.0
    else:  # tiny's frame; a raw frame is made for each line
        msg = Image(height=8, width=8, encoding="rgb8", step=24, data=bytes(192))
    pub = node.create_publisher(type(msg), topic, 10)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:  # the node has matched
        time.sleep(0.1)
    time.sleep(0.5)
    sent = 0
    if frames in ("tiny", "odometry"):
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            stamp = T0 + 100_000 + sent / hz
            msg.header.stamp = Time(sec=int(stamp), nanosec=int(stamp % 1 * 1e9))
            pub.publish(msg)
            sent += 1
            time.sleep(max(0.0, start + sent / hz - time.monotonic()))
    else:
        for line in sys.stdin:
            i = int(line)
            w, h, enc, c = (
                (3840, 2160, ("rgb8", "bgra8")[i % 2], 3 + i % 2) if frames == "4k" else (8000, 8000, "rgb8", 3)
            )
            msg = Image(
                height=h, width=w, encoding=enc, step=w * c, data=np.full(w * h * c, i % 251, np.uint8).tobytes()
            )
            msg.header.stamp = Time(sec=first_stamp(frames) + 10 * i)
            pub.publish(msg)
            sent += 1
            if frames == "oversized":
                time.sleep(2.0)  # a reliable writer sends its fragments after publish() returns
            print(f"published {i}", flush=True)
    print(f"sent {sent}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def first_stamp(kind: str) -> int:
    """The stamp (seconds) of the first raw frame of ``kind``; the next ones are 10 s apart."""
    return T0 + (1000 if kind == "4k" else 5000)


def sent_count(publisher: subprocess.Popen, timeout_s: float) -> int:
    """Wait for a rate publisher of :func:`start_publisher` to end; the messages it sent."""
    return int(publisher.communicate(timeout=timeout_s)[0].split()[-1])


def start_publisher(env: dict, frames: str, hz: float = 0.0, seconds: float = 0.0) -> subprocess.Popen:
    """:func:`publish` in its own process (its own GIL, as a camera driver is)."""
    return subprocess.Popen(
        [sys.executable, "-m", "infmllm_ros.bench.limits", "--publish", frames, str(hz), str(seconds)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def memory_kib(pid: int) -> dict:
    """``RssAnon`` (private) and ``RssShmem`` (shared-memory mappings) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class Front:
    """The test side: a JPEG front camera at 1 Hz, the node's frame reports, ``/diagnostics`` and
    ``/ask``, on one rclpy node spun on a thread."""

    def __init__(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CompressedImage
        from std_msgs.msg import Header

        rclpy.init()
        self.node = rclpy.create_node("limits_front")
        self.pub = self.node.create_publisher(CompressedImage, FRONT, 10)
        self.reports: dict[tuple[str, int, int], str] = {}
        self.status: dict = {}
        self.node.create_subscription(Header, "/infmllm/frames", self._on_report, 1000)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_status, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.sec = T0

    def _on_report(self, msg) -> None:
        camera, _, outcome = msg.frame_id.rpartition(":")
        self.reports[(camera, msg.stamp.sec, msg.stamp.nanosec)] = outcome

    def _on_status(self, msg) -> None:
        self.status = {kv.key: kv.value for kv in msg.status[0].values}

    def wait_report(self, camera: str, sec: int, timeout_s: float) -> str | None:
        """The outcome the node reported for ``camera``'s frame stamped ``sec``, or None."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (camera, sec, 0) in self.reports:
                return self.reports[(camera, sec, 0)]
            time.sleep(0.02)
        return None

    def send_front(self, timeout_s: float = 30.0) -> str | None:
        """Publish the next front frame (a cat every 5th second, else a flat road) once; its outcome."""
        import cv2
        from builtin_interfaces.msg import Time
        from sensor_msgs.msg import CompressedImage
        from skimage.data import chelsea

        self.sec += 1
        rgb = chelsea() if self.sec % 5 == 0 else np.full((120, 160, 3), 40 + self.sec % 100, np.uint8)
        data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
        msg = CompressedImage(format="jpeg", data=data)
        msg.header.stamp = Time(sec=self.sec)
        deadline = time.monotonic() + 30
        while self.pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.pub.publish(msg)
        return self.wait_report("front", self.sec, timeout_s)

    def ask(self) -> float | None:
        """Seconds ``/ask`` took for :data:`QUESTION` (None: refused or no answer in 120 s)."""
        from ..tools.ask import call_ask

        t0 = time.monotonic()
        answer = call_ask(self.node, "/ask", QUESTION, 24)
        return time.monotonic() - t0 if answer is not None and answer.success else None

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.thread.join(5.0)
        self.node.destroy_node()
        rclpy.try_shutdown()


def raw_frames(env: dict, front: Front, kind: str, count: int, wait_s: float = 60.0) -> list[str | None]:
    """Publish ``count`` raw frames of ``kind`` (``4k`` or ``oversized``) on the rear camera, one
    at a time, each waited for (``wait_s`` seconds after its publisher has sent it); their
    outcomes (None: never reported). The publisher is a raw camera driver: ``env``'s Fast DDS
    profile with the segment of ``config/fastdds_shm_camera.xml``.

    Raises:
        RuntimeError: the publisher got no shared-memory segment, or exited before it had sent
            them all.
    """
    from ..ros.shared_memory import segment_sizes, with_segment_size

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="camera-") as tmp:
        profile = env.get("FASTDDS_DEFAULT_PROFILES_FILE")
        if profile:
            (size,) = segment_sizes(ROOT / "config" / "fastdds_shm_camera.xml")
            camera_profile = with_segment_size(Path(profile), size, Path(tmp) / "camera.xml")
            env = dict(env, FASTDDS_DEFAULT_PROFILES_FILE=str(camera_profile))
        pub = start_publisher(env, kind)
        try:
            shared_memory = _next_line(pub, "shared memory ")
            if shared_memory != "on":  # its frames could only be lost: say why now
                raise RuntimeError(f"the {kind} camera publisher's shared memory: {shared_memory}")
            for i in range(count):
                pub.stdin.write(f"{i}\n")
                pub.stdin.flush()
                if _next_line(pub, "published ") is None:
                    raise RuntimeError(f"the {kind} publisher exited with {pub.wait(30)} before frame {i}")
                outcomes.append(front.wait_report("rear", first_stamp(kind) + 10 * i, wait_s))
        finally:
            pub.stdin.close()
            pub.wait(30)
    return outcomes


def _next_line(proc: subprocess.Popen, prefix: str) -> str | None:
    """The rest of ``proc``'s next stdout line that starts with ``prefix`` (Fast DDS logs to the
    same stdout); None once it has exited."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def flood(env: dict, front: Front, pid: int, hz: float, seconds: float) -> dict:
    """The flood of the module docstring: latencies, front outcomes, rear counters, CPU."""
    flooder = start_publisher(env, "tiny", hz, seconds)
    time.sleep(2.0)  # the flood is running
    status0, cpu0, t0 = dict(front.status), cpu_s(pid), time.monotonic()
    end = t0 + seconds - 4
    latencies: list[float | None] = []
    outcomes: list[str | None] = []

    def front_camera() -> None:  # 1 Hz whatever the answers take, as a camera driver is
        tick = t0
        while tick < end:
            outcomes.append(front.send_front())
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))

    camera = threading.Thread(target=front_camera, name="front-camera")
    camera.start()
    while time.monotonic() < end:
        tick = time.monotonic()
        latencies.append(front.ask())
        time.sleep(max(0.0, tick + 2.0 - time.monotonic()))
    camera.join()
    cpu1, t1 = cpu_s(pid), time.monotonic()
    sent = sent_count(flooder, seconds + 30)
    time.sleep(1.5)
    status1 = dict(front.status)

    def delta(key: str) -> int:
        return int(status1.get(key, 0)) - int(status0.get(key, 0))

    rear_not_ingested = delta("camera_rear_read") + delta("camera_rear_unread")
    return {
        "flood_hz": hz,
        "flood_s": seconds,
        "rear_sent": sent,
        "rear_read": delta("camera_rear_read"),
        "rear_unread": delta("camera_rear_unread"),
        "front_sent": len(outcomes),
        "front_ingested": outcomes.count("ingested"),
        "front_outcomes": outcomes,
        "latencies_s": latencies,
        "node_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
        "node_cpu_us_per_rear_frame": 1e6 * (cpu1 - cpu0) / max(1, rear_not_ingested),
    }


def odometry(env: dict, front: Front, pid: int, hz: float, seconds: float) -> dict:
    """The odometry step of the module docstring: poses sent and received, and the node's CPU
    over the publisher's life (its start and the idle node included)."""
    before, cpu0, t0 = int(front.status.get("poses_received", 0)), cpu_s(pid), time.monotonic()
    publisher = start_publisher(env, "odometry", hz, seconds)
    sent = sent_count(publisher, seconds + 60)
    cpu1, t1 = cpu_s(pid), time.monotonic()
    time.sleep(1.5)  # the last diagnostics
    received = int(front.status.get("poses_received", 0)) - before
    return {
        "pose_hz": hz,
        "pose_s": seconds,
        "sent": sent,
        "received": received,
        "node_cpu_cores": (cpu1 - cpu0) / (t1 - t0),
        "node_cpu_us_per_pose": 1e6 * (cpu1 - cpu0) / max(1, sent),
    }


@contextmanager
def shipped_node():
    """A node with :func:`shipped_parameters` in its own process and a :class:`Front` beside it,
    on a fresh loopback ROS environment: yields ``(env, node pid, front)``; stops both after."""
    from ..tools.processes import ros_env, start_node, stop_node

    env = ros_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc, _ = start_node(Path(tempfile.mkdtemp(prefix="limits-")), env, shipped_parameters())
    front = None
    try:
        front = Front()
        yield env, proc.pid, front
    finally:
        if front is not None:
            front.close()
        stop_node(proc)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run(out: Path, flood_hz: float, flood_s: float, frames_4k: int, pose_hz: float, pose_s: float) -> dict:
    """The whole benchmark; returns the result dict (also written to ``out``.json/.md)."""
    with shipped_node() as (env, pid, front):
        assert front.send_front() == "ingested", "the node did not take a front frame"
        idle = [front.ask() for _ in range(5)]
        print(f"idle answers: {[round(x, 2) for x in idle]} s", flush=True)
        outcomes_4k = raw_frames(env, front, "4k", frames_4k)
        print(f"raw 4K frames: {outcomes_4k}", flush=True)
        before = memory_kib(pid)
        (oversized,) = raw_frames(env, front, "oversized", 1)
        time.sleep(2.0)
        after = memory_kib(pid)
        print(f"oversized frame: {oversized}; memory {before} -> {after} KiB", flush=True)
        flooded = flood(env, front, pid, flood_hz, flood_s)
        print(f"flood: {flooded}", flush=True)
        poses = odometry(env, front, pid, pose_hz, pose_s)
        print(f"odometry: {poses}", flush=True)
    done = [x for x in flooded["latencies_s"] if x is not None]
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "infmllm-bench-limits " + " ".join(sys.argv[1:]),
        "config": "config/desktop.yaml as shipped; config/fastdds_loopback.xml",
        "raw_4k": {"sent": frames_4k, "ingested": outcomes_4k.count("ingested"), "outcomes": outcomes_4k},
        "oversized": {
            "pixels": 8000 * 8000,
            "bytes": 8000 * 8000 * 3,
            "outcome": oversized,
            "memory_before_kib": before,
            "memory_after_kib": after,
        },
        "idle_latency_s": idle,
        "flood": flooded,
        "odometry": poses,
        "latency_ratio_median": statistics.median(done) / statistics.median(idle) if done else None,
        "latency_ratio_max": max(done) / statistics.median(idle) if done else None,
    }
    rows = [
        ["raw 4K frames (rgb8, bgra8) ingested", f"{result['raw_4k']['ingested']} / {frames_4k}"],
        [
            "183 MiB raw frame",
            f"{oversized}; private RSS {(after['RssAnon'] - before['RssAnon']) / 1024:+.0f} MiB, "
            f"shared-memory RSS {(after['RssShmem'] - before['RssShmem']) / 1024:+.0f} MiB, "
            f"peak RSS {after['VmHWM'] / 1024:.0f} MiB",
        ],
        ["answer latency idle (median)", f"{statistics.median(idle):.2f} s"],
        [
            f"answer latency, rear at {flood_hz:.0f} Hz (median / max)",
            f"{statistics.median(done):.2f} / {max(done):.2f} s ({len(done)} of {len(flooded['latencies_s'])})"
            if done
            else "none answered",
        ],
        ["front frames ingested during the flood", f"{flooded['front_ingested']} / {flooded['front_sent']}"],
        [
            "rear frames sent / read / replaced unread",
            f"{flooded['rear_sent']} / {flooded['rear_read']} / {flooded['rear_unread']}",
        ],
        [
            "node CPU during the flood (all of it: front ingest and answers included)",
            f"{flooded['node_cpu_cores']:.2f} cores, "
            f"{flooded['node_cpu_us_per_rear_frame']:.0f} us per rear frame not ingested",
        ],
        [
            f"odometry at {pose_hz:.0f} Hz for {pose_s:.0f} s: received / sent, node CPU",
            f"{poses['received']} / {poses['sent']}, {poses['node_cpu_cores']:.2f} cores, "
            f"{poses['node_cpu_us_per_pose']:.0f} us per pose",
        ],
    ]
    markdown = (
        f"# Limits as shipped\n\n{describe(result['machine'])} {result['date']}, `{result['command']}`.\n\n"
        + markdown_table(["what", "measured"], rows)
    )
    write_report(out, result, markdown)
    return result


def main(argv=None) -> int:
    """Console entry point (0: ran; the figures are in the report)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", default="bench/results/limits_cpu.json", help="result JSON (markdown beside it)")
    p.add_argument("--flood-hz", type=float, default=500.0, help="rear camera rate during the flood")
    p.add_argument("--flood-s", type=float, default=60.0, help="seconds of flood")
    p.add_argument("--frames-4k", type=int, default=10, help="raw 4K frames sent (rgb8 and bgra8 in turn)")
    p.add_argument("--pose-hz", type=float, default=500.0, help="odometry rate")
    p.add_argument("--pose-s", type=float, default=20.0, help="seconds of odometry")
    p.add_argument("--publish", nargs=3, metavar=("FRAMES", "HZ", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.publish:
        frames, hz, seconds = args.publish
        publish(POSES if frames == "odometry" else REAR, frames, float(hz), float(seconds))
        return 0
    run(Path(args.json), args.flood_hz, args.flood_s, args.frames_4k, args.pose_hz, args.pose_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
