"""Check a colcon install space the way a robot uses it: start its ``infmllm_node``, publish one
camera frame, ask one question on ``/ask``, stop the node with SIGINT and require exit status 0.

Run it with the install space sourced (``. install/setup.sh``), so that ``infmllm_ros`` and
``infmllm_interfaces`` are imported from the install space and not from a source checkout
(``-P``: the current folder, perhaps the checkout, is not put on the module path)::

    python -P -m infmllm_ros.tools.install_check --install install

Exits 0 when every step passes, 1 naming the step that failed (the node's log is printed).
The node runs the embedded demo model with loopback-only discovery in a random domain
(:func:`~infmllm_ros.tools.processes.ros_env`).
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from .processes import ros_env, start_node, stop_node

TOPIC = "/install_check/image_raw/compressed"


def frame_message(stamp_s: int):
    """A 160x120 JPEG ``sensor_msgs/CompressedImage`` of coloured stripes stamped ``stamp_s``."""
    from builtin_interfaces.msg import Time
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    bgr = np.zeros((120, 160, 3), np.uint8)
    for i, colour in enumerate(((0, 0, 220), (0, 200, 0), (220, 0, 0), (0, 200, 200))):
        bgr[:, i * 40 : (i + 1) * 40] = colour
    return CompressedImage(
        header=Header(stamp=Time(sec=stamp_s), frame_id="camera"),
        format="jpeg",
        data=cv2.imencode(".jpg", bgr)[1].tobytes(),
    )


def installed_from(install: Path, module: str) -> Path:
    """Where ``module`` is imported from; raises ``RuntimeError`` if that is outside ``install``."""
    import importlib

    path = Path(importlib.import_module(module).__file__).resolve()
    if not path.is_relative_to(install.resolve()):
        raise RuntimeError(f"{module} is imported from {path}, not from the install space {install} (source it)")
    return path


def ask_once(env: dict, timeout_s: float) -> str:
    """Publish frames until the node reports one ingested, then ask one question; the answer."""
    import os

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    from .ask import call_ask

    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")})
    if "FASTDDS_DEFAULT_PROFILES_FILE" in env:
        os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = env["FASTDDS_DEFAULT_PROFILES_FILE"]
    rclpy.init()
    node = rclpy.create_node("install_check")
    reports: list[str] = []
    node.create_subscription(Header, "/infmllm/frames", lambda m: reports.append(m.frame_id), 10)
    publisher = node.create_publisher(CompressedImage, TOPIC, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        deadline, stamp = time.monotonic() + timeout_s, 1_700_000_000
        while not any(r.endswith(":ingested") for r in reports):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no frame on {TOPIC} was ingested in {timeout_s:g} s (reports: {reports})")
            publisher.publish(frame_message(stamp))
            stamp += 1
            time.sleep(0.5)
        response = call_ask(node, "/ask", "What did you see?", 16, timeout_s=timeout_s)
        if response is None or not response.success or not response.answer.strip():
            raise RuntimeError(f"/ask failed: {response}")
        return response.answer
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


def check(install: Path, timeout_s: float) -> str:
    """Every step of the module docstring; the node's answer.

    Raises:
        RuntimeError: the step that failed (with the node's log once it has started).
    """
    node_exe = install / "infmllm_ros" / "lib" / "infmllm_ros" / "infmllm_node"
    for module in ("infmllm_ros", "infmllm_interfaces"):
        print(f"{module}: {installed_from(install, module)}")
    if not node_exe.is_file():
        raise RuntimeError(f"{node_exe} is missing: colcon did not install the node")
    env = ros_env()
    with tempfile.TemporaryDirectory() as tmp:
        params = {"camera_topics": [TOPIC], "qos_reliability": "reliable", "novelty_threshold": 0.0}
        proc, log = start_node(Path(tmp), env, params, timeout_s=timeout_s, executable=node_exe)
        try:
            answer = ask_once(env, timeout_s)
        except RuntimeError as exc:
            stop_node(proc)
            raise RuntimeError(f"{exc}\n{log.read_text()}") from exc
        status = stop_node(proc)
        if status != 0:
            raise RuntimeError(f"the node exited {status} on SIGINT\n{log.read_text()}")
    return f"{node_exe} answered {answer!r} and exited 0 on SIGINT"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--install", type=Path, default=Path("install"), help="the colcon install space")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds for each step")
    args = ap.parse_args(argv)
    try:
        print(f"install check passed: {check(args.install, args.timeout)}")
    except RuntimeError as exc:
        print(f"install check failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
