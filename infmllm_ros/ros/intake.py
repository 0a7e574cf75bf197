"""Camera intake: the camera subscriptions on a node and thread of their own, read at a bounded
rate, so that a camera flooding its topic costs O(1) per surplus frame and never starves answers
or the other cameras.

Why a thread of its own: in one process, the rclpy executor and the model's worker share the GIL.
With the subscriptions on the node's ``MultiThreadedExecutor``, a camera sending 8x8 frames at
500 Hz kept that executor's Python loop always ready: it took a full core to read 3-6% of the
frames, and an answer that takes 0.5 s idle took 28 s (bench/results/README.md, "Limits as shipped").

How it bounds the cost: each subscription keeps its QoS (best effort, keep-last 1 by default), so
frames that arrive faster than they are read replace each other inside DDS, in C++, without the
GIL. This thread reads at most ``max_rate_hz`` x (number of cameras) messages a second; rclpy's
executor serves every subscription that is ready in one wait before it waits again, so the
cameras with a frame waiting take turns and a 1 Hz camera is read within one turn however fast
another one sends. Frames that were replaced unread are counted per camera from the gaps in
each publisher's sequence numbers (``MessageInfo.publication_sequence_number``).

Oversized raw frames are kept out before any byte of them is sent: a raw camera's subscription
carries a DDS content filter on its ``width`` and ``height`` (:func:`size_filter`), which a Fast
DDS publisher evaluates before it writes the sample, so a 183 MiB frame costs the node nothing
(+151 MiB of reassembly buffer without the filter; bench/results/README.md, "Limits as
shipped"). A publisher on another DDS implementation may leave the filter to the reader, after
reassembly. The filter cannot multiply: it lets through every frame within ``max_frame_pixels``
and none of more than twice that; the node refuses the rest from the header fields.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile
from rclpy.subscription_content_filter_options import ContentFilterOptions
from sensor_msgs.msg import CompressedImage, Image

#: Seconds the intake waits for a message before it checks whether it should stop.
POLL_S = 0.1
#: Smallest frame side the model takes (pixels); the size filter's bands start there.
MIN_SIDE = 8


def size_filter(max_pixels: int) -> ContentFilterOptions:
    """A content filter on ``sensor_msgs/Image`` that passes every frame of at most ``max_pixels``
    pixels (sides >= :data:`MIN_SIDE`) and none of more than ``2 * max_pixels``.

    DDS filter expressions compare fields with parameters and cannot multiply, so the hyperbola
    ``width * height <= max_pixels`` is covered by bands ``height <= 2h AND width <= max_pixels / h``
    for ``h = 8, 16, 32, ...``: a frame of height in ``[h, 2h]`` within the limit is in band ``h``,
    and any frame in band ``h`` has at most ``2h * max_pixels / h`` pixels.

    Raises:
        ValueError: ``max_pixels`` below ``MIN_SIDE**2``.
    """
    if max_pixels < MIN_SIDE * MIN_SIDE:
        raise ValueError(f"max_pixels must be >= {MIN_SIDE * MIN_SIDE}, got {max_pixels}")
    bands, params = [], []
    h = MIN_SIDE
    while max_pixels // h >= MIN_SIDE:
        bands.append(f"(height <= %{len(params)} AND width <= %{len(params) + 1})")
        params += [str(2 * h), str(max_pixels // h)]
        h *= 2
    return ContentFilterOptions(filter_expression=" OR ".join(bands), expression_parameters=params)


class SubscriberThread:
    """Subscriptions on a node of their own (``<parent>_<suffix>``, same namespace and context),
    served by a single-threaded executor on a thread of their own, out of the parent's
    ``MultiThreadedExecutor``: rclpy's multi-threaded executor hands each message to its thread
    pool as a task and, until a pool thread starts it, yields that task again, holding the GIL
    (ros2/rclpy#1452). At sensor rates that starves the model's worker and loses messages
    (bench/results/README.md, "Limits as shipped": 500 Hz odometry).

    Subclasses add their subscriptions to :attr:`node`; :meth:`_run` spins until :meth:`stop`.
    """

    def __init__(self, parent, suffix: str):
        self.node = rclpy.create_node(
            f"{parent.get_name()}_{suffix}",
            namespace=parent.get_namespace(),
            context=parent.context,
            start_parameter_services=False,
            enable_rosout=False,
        )
        self._executor = SingleThreadedExecutor(context=parent.context)
        self._executor.add_node(self.node)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"infmllm-{suffix}", daemon=True)

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop reading (the message in hand is handed over first) and destroy the subscriptions
        and the node."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._executor.shutdown()
        self.node.destroy_node()

    def _spin_once(self) -> bool:
        """Serve what is ready, waiting up to :data:`POLL_S`; False once stopping or shut down."""
        try:
            self._executor.spin_once(timeout_sec=POLL_S)
        except Exception:  # the context is shutting down
            if self._stop.is_set() or not self.node.context.ok():
                return False
            raise
        return True

    def _run(self) -> None:
        while not self._stop.is_set() and self._spin_once():
            pass


class CameraIntake(SubscriberThread):
    """Camera subscriptions on their own node (``<parent>_cameras``) and thread, read at a
    bounded rate.

    Args:
        parent: the node the cameras belong to (its context, namespace and name).
        cameras: ``(topic, camera name, compressed)`` per subscription.
        qos: the subscriptions' QoS (keep-last: a deeper queue only delays the newest frame).
        on_frame: called ``(msg, camera, compressed)`` on the intake thread for each message read.
        max_rate_hz: messages read per second per camera at most, on average over the cameras
            (the thread's budget is this x cameras; > 0), or 0 for no limit.
        max_pixels: raw frames over twice this many pixels are filtered out by DDS (:func:`size_filter`).

    The counters (:meth:`stats`) are per camera: ``read`` (handed to ``on_frame``) and
    ``unread`` (sent by a publisher and replaced in the subscription's queue before it was read).
    """

    def __init__(
        self,
        parent,
        cameras: list[tuple[str, str, bool]],
        qos: QoSProfile,
        on_frame: Callable[[Any, str, bool], None],
        max_rate_hz: float,
        max_pixels: int,
    ):
        super().__init__(parent, "cameras")
        self._on_frame = on_frame
        self._period_s = 1.0 / (max_rate_hz * len(cameras)) if max_rate_hz > 0 else 0.0
        self._lock = threading.Lock()
        self._read: Counter = Counter()
        self._unread: Counter = Counter()
        self._last_seq: dict[tuple[str, bytes], int] = {}
        self.subscriptions = []
        for topic, camera, compressed in cameras:
            self.subscriptions.append(
                self.node.create_subscription(
                    CompressedImage if compressed else Image,
                    topic,
                    lambda msg, info, c=camera, z=compressed: self._take(msg, info, c, z),
                    qos,
                    content_filter_options=None if compressed else size_filter(max_pixels),
                )
            )

    def set_max_pixels(self, max_pixels: int) -> None:
        """Apply a new pixel limit to the raw cameras' size filters."""
        options = size_filter(max_pixels)
        for sub in self.subscriptions:
            if sub.msg_type is Image and sub.is_cft_enabled:
                sub.set_content_filter(options.filter_expression, options.expression_parameters)

    def stats(self) -> dict[str, tuple[int, int]]:
        """``camera -> (read, unread)`` since start."""
        with self._lock:
            return {c: (self._read[c], self._unread[c]) for c in set(self._read) | set(self._unread)}

    def resolved_topics(self) -> list[str]:
        """The subscriptions' topics as resolved (namespace and remapping applied)."""
        return [sub.topic_name for sub in self.subscriptions]

    def _take(self, msg, info: dict, camera: str, compressed: bool) -> None:
        seq, gid = info.get("publication_sequence_number"), info.get("publisher_gid")
        with self._lock:
            self._read[camera] += 1
            if seq is not None and gid is not None:
                key = (camera, bytes(gid.get("data", b"")) if isinstance(gid, dict) else bytes(gid))
                last = self._last_seq.get(key)
                if last is not None and seq > last + 1:
                    self._unread[camera] += seq - last - 1
                if last is None or seq > last:
                    self._last_seq[key] = seq
        self._on_frame(msg, camera, compressed)

    def _run(self) -> None:
        while not self._stop.is_set():
            before = sum(self._read.values())
            if not self._spin_once():
                return
            if self._period_s and sum(self._read.values()) != before:
                self._stop.wait(self._period_s)


class PoseIntake(SubscriberThread):
    """The robot's pose topic on its own node (``<parent>_poses``) and thread: odometry comes at
    20-200 Hz and each message is handed to ``on_pose`` (on this thread) as it arrives.

    Args:
        parent: the node the poses belong to.
        topic: the pose topic. msg_type: its message class. depth: the reliable keep-last queue.
        on_pose: called with each message.
    """

    def __init__(self, parent, topic: str, msg_type, on_pose: Callable[[Any], None], depth: int = 50):
        super().__init__(parent, "poses")
        self.subscription = self.node.create_subscription(msg_type, topic, on_pose, depth)
