"""The test process's side of a ROS graph: one rclpy node that publishes frames, listens to the
node's ``~/frames`` and ``/diagnostics``, and sets its parameters. Used by the DDS tests."""

import os
import threading
import time
from contextlib import contextmanager

import cv2
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from infmllm_ros.tools.processes import ros_env, start_node


class Graph:
    """This test process's ROS node: a publisher per camera (``publishers``: attribute name ->
    (message type, topic)), listeners, an /ask client, a parameter client."""

    def __init__(self, env: dict, publishers: dict):
        self.saved = {
            k: os.environ.get(k)
            for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "FASTDDS_DEFAULT_PROFILES_FILE")
        }
        os.environ.update({k: env[k] for k in self.saved if k in env})
        rclpy.init()
        self.node = rclpy.create_node("itest")
        for name, (msg_type, topic) in publishers.items():
            setattr(self, name, self.node.create_publisher(msg_type, topic, 10))
        self.frames, self.diagnostics = [], []
        self.node.create_subscription(Header, "/infmllm/frames", self.frames.append, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self.spinner.start()

    def close(self):
        self.executor.shutdown()
        self.spinner.join(5)
        self.node.destroy_node()
        rclpy.try_shutdown()
        for k, v in self.saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def publish_and_wait(self, pub, msg, timeout_s=30.0, reported=None) -> str:
        """Publish until the node reports the frame (best-effort can lose one); its outcome.
        ``reported``: the ``(sec, nanosec)`` the node reports it under, if not the header's.
        Once the frame has been sent again, ``sampled_out`` may be the node refusing our own
        second copy while it still ingests the first (a 4K frame on a busy machine takes over
        a second): another outcome is waited for, and ``sampled_out`` returned only if none
        comes."""
        deadline = time.monotonic() + timeout_s
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        stamp = reported or (msg.header.stamp.sec, msg.header.stamp.nanosec)
        sent, outcomes = 0, []
        while time.monotonic() < deadline:
            pub.publish(msg)
            sent += 1
            for _ in range(20):
                time.sleep(0.05)
                outcomes = [
                    f.frame_id.rpartition(":")[2] for f in list(self.frames) if (f.stamp.sec, f.stamp.nanosec) == stamp
                ]
                settled = [o for o in outcomes if o != "sampled_out"] if sent > 1 else outcomes
                if settled:
                    return settled[0]
        if outcomes:
            return outcomes[0]
        raise AssertionError(f"node never reported the frame stamped {stamp}")

    def call(self, srv_type, name: str, request, timeout_s: float = 120.0):
        """Call service ``name`` and wait for its response (None on timeout)."""
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=30), f"no service {name}"
            future = client.call_async(request)
            deadline = time.monotonic() + timeout_s
            while not future.done() and time.monotonic() < deadline:
                time.sleep(0.05)
            return future.result() if future.done() else None
        finally:
            self.node.destroy_client(client)

    def set_parameters(self, values: dict, node: str = "/infmllm"):
        """Set the node's parameters over ``set_parameters``; one ``SetParametersResult`` each."""
        return self.call(
            SetParameters,
            f"{node}/set_parameters",
            SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]),
        ).results

    def latest_status(self):
        """The node's ``/diagnostics`` values from a message stamped after this call."""
        now, deadline = time.time(), time.monotonic() + 10
        while time.monotonic() < deadline:
            fresh = [m for m in list(self.diagnostics) if m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 > now]
            if fresh:
                return {kv.key: kv.value for kv in fresh[-1].status[0].values}
            time.sleep(0.1)
        raise AssertionError("no /diagnostics message within 10 s")

    def status_when(self, ready, timeout_s: float = 10.0) -> dict:
        """The first fresh ``/diagnostics`` values for which ``ready(values)`` holds: counters are
        published on the diagnostics period, after the outcome a frame report carries; the last
        values seen if none holds within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        status = self.latest_status()
        while not ready(status) and time.monotonic() < deadline:
            status = self.latest_status()
        return status


def header(sec, nanosec=0):
    return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="cam")


def jpeg(rgb, sec, nanosec=0) -> CompressedImage:
    """An RGB ``uint8 [h, w, 3]`` frame as a JPEG ``CompressedImage`` stamped ``sec``.``nanosec``."""
    return CompressedImage(
        header=header(sec, nanosec),
        format="jpeg",
        data=cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(),
    )


def one_camera(topic: str, overrides: dict | None = None) -> dict:
    """Node parameters of the single-camera DDS tests: a JPEG camera on ``topic`` over reliable
    keep-last-5 QoS, 512 KV slots with 128 recent; ``overrides`` (dotted names) added last."""
    return {
        "camera_topics": [topic],
        "qos_reliability": "reliable",
        "qos_depth": 5,
        "cache.capacity": 512,
        "cache.recent": 128,
        **(overrides or {}),
    }


@contextmanager
def camera_graph(msg_type, topic: str):
    """A fresh ROS environment and a :class:`Graph` that publishes ``msg_type`` on ``topic`` as
    ``camera``: ``(env, graph)``."""
    env = ros_env()
    graph = Graph(env, {"camera": (msg_type, topic)})
    try:
        yield env, graph
    finally:
        graph.close()


def two_camera_node(tmp, front: str, rear: str, **params):
    """A node watching ``front`` (JPEG) and ``rear`` (raw) over reliable QoS, 512 KV slots, and a
    graph publishing to both: ``(env, process, log path, graph)``; ``params`` override."""
    env = ros_env()
    proc, log = start_node(
        tmp,
        env,
        {
            "camera_topics": [front, rear],
            "camera_transports": ["compressed", "raw"],
            "camera_names": ["front", "rear"],
            "qos_reliability": "reliable",
            "qos_depth": 5,
            "cache.capacity": 512,
            "cache.recent": 128,
            "max_new_tokens": 24,
            "diagnostics_period_s": 0.5,
            **params,
        },
    )
    return env, proc, log, Graph(env, {"front": (CompressedImage, front), "rear": (Image, rear)})
