"""The ingest worker: the one thread that runs the model, feeding camera frames into the
:class:`StreamSession` and answering the questions handed to it with :meth:`IngestWorker.call`.

One thread for all model compute keeps memory flat: glibc gives every allocating thread its own
malloc arena, so questions decoded on whichever executor thread served them grew the node's RSS
by ~1 GiB over six questions (measured on a 5-minute replay); questions run before pending frames.

Subscription callbacks only :meth:`IngestWorker.offer` a message (a stamp comparison and a dict
assignment), so the executor never waits on vision or prefill. The worker keeps the *newest*
pending frame per camera: a frame that is replaced before the worker takes it is counted as
dropped. Decoding, near-duplicate skipping and ingest happen on the worker thread. Nothing here
imports rclpy, so the logic is tested without a ROS graph.

Every offered frame ends with exactly one outcome, reported to ``on_done``:
``ingested``, ``sampled_out`` (faster than ``sample_rate_hz``), ``duplicate`` (thumbnail within
``duplicate_threshold`` of the camera's last ingested frame), ``dropped`` (replaced by a newer
frame), ``rejected`` (cannot be decoded: corrupt, unknown encoding, wrong size), ``too_large``
(more pixels than ``max_frame_pixels``, found from the header before any pixel is decoded),
``bad_stamp`` (refused by the node before it was offered: a stamp ahead of the node clock by more
than its skew, or a malformed one; :meth:`IngestWorker.reject`), ``late`` (older than its
camera's newest frame by up to ``clock_reset_s``: a reordered frame), ``failed`` (the model
raised; logged with its traceback).

Stamp rules, per camera: each camera is ordered on its own clock. A frame older than its
camera's newest ingested frame by at most ``clock_reset_s`` is ``late``; by more, the camera's
clock has jumped back (a bag played in a loop, a simulator restart, a driver that switched from
its boot clock to wall time): its order restarts from that frame (``clock_resets`` counts it) and
memory is kept, so stamps in the stream repeat rather than the camera going blind.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..runtime.pose import Pose, PoseMatcher
from .images import FrameError, FrameTooLarge, frame_difference, thumbnail, to_rgb

#: Every outcome of a frame (its ``~/frames`` suffix; each one counted on ``/diagnostics`` as
#: ``frames_<outcome>``).
OUTCOMES = ("ingested", "sampled_out", "duplicate", "dropped", "rejected", "too_large", "bad_stamp", "late", "failed")
#: Outcomes that are logged as warnings and kept as ``last_error``.
BAD_OUTCOMES = ("rejected", "too_large", "bad_stamp", "late", "failed")


@dataclass
class PendingFrame:
    """A received camera message waiting for the worker.

    Attributes:
        camera: camera name (the ``cam=`` tag). stamp_s: header stamp, seconds (ROS time).
        msg: the ``sensor_msgs/Image`` or ``CompressedImage``. compressed: which of the two.
    """

    camera: str
    stamp_s: float
    msg: Any
    compressed: bool


@dataclass
class WorkerStats:
    """Counters and last timings (milliseconds) for ``/diagnostics``; a snapshot copy."""

    outcomes: Counter = field(default_factory=Counter)
    received: int = 0
    stored: int = 0  # ingested frames written to the KV cache (the others only updated the scene)
    last_ingest_ms: float = math.nan
    mean_ingest_ms: float = math.nan
    last_vision_ms: float = math.nan
    last_prefill_ms: float = math.nan
    evicted_tokens: int = 0
    last_error: str = ""
    origin_s: float = math.nan
    clock_resets: int = 0
    poses_received: int = 0
    poses_refused: int = 0
    frames_with_pose: int = 0  # stored frames given a pose within the tolerance (the matcher's count)


class IngestWorker:
    """Owns the ingest side of one :class:`StreamSession` on a background thread.

    Args:
        session: the stream (its ``ingest_frame(rgb, stamp_s, camera)`` is called here only).
        sample_rate_hz: frames per second ingested per camera, by header stamp (<= 0: all).
        duplicate_threshold: skip a frame whose 32x32 grey thumbnail differs from the camera's last
            ingested one by less than this mean absolute difference in [0, 1] (0: never skip).
        on_done: called ``(frame, outcome, detail)`` once per offered frame, from the thread
            that decided it (the caller's for ``sampled_out``/``dropped``, the worker's otherwise).
        log: called with a warning line for each frame with a :data:`BAD_OUTCOMES` outcome and
            each clock reset.
        max_frame_pixels: frames with more pixels (width x height) are ``too_large``.
        clock_reset_s: seconds a camera's stamp may go back before it counts as a clock reset
            (see the module docstring).
        poses: matches the robot's pose to each stored frame by ROS stamp (:meth:`add_pose`
            feeds it), or None when no pose topic is watched.

    Stamps in the stream are seconds since the first ingested frame (``origin_s``), so answers
    quote drive time ("t=312.0s"); the first ingested frame's ROS stamp is kept as the origin.
    """

    def __init__(
        self,
        session,
        sample_rate_hz: float,
        duplicate_threshold: float,
        on_done: Callable[[PendingFrame, str, str], None] = lambda *a: None,
        log: Callable[[str], None] = print,
        max_frame_pixels: int = 4096 * 4096,
        clock_reset_s: float = 2.0,
        poses: PoseMatcher | None = None,
    ):
        self.session, self.poses = session, poses
        self.max_frame_pixels, self.clock_reset_s = max_frame_pixels, clock_reset_s
        self.sample_rate_hz = sample_rate_hz
        self.duplicate_threshold = duplicate_threshold
        self._on_done, self._log = on_done, log
        self._pending: dict[str, PendingFrame] = {}
        self._jobs: deque = deque()
        self._last_offered: dict[str, float] = {}
        self._last_thumb: dict = {}
        self._cond = threading.Condition()
        self._stats = WorkerStats()
        self._ingest_ms_sum = 0.0
        self._stop = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="infmllm-ingest", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Ask the worker to finish the frame in hand and exit; True if it did within ``timeout_s``."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stats(self) -> WorkerStats:
        """A consistent copy of the counters."""
        with self._cond:
            snap = WorkerStats(
                **{
                    **self._stats.__dict__,
                    "outcomes": Counter(self._stats.outcomes),
                    "frames_with_pose": self.poses.matched if self.poses else 0,
                }
            )
        return snap

    def idle(self) -> bool:
        """True when no frame is pending or being ingested."""
        with self._cond:
            return not self._pending and not self._busy

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread before any pending frame; its result or exception
        arrives in the returned future.

        Raises:
            RuntimeError: the worker has stopped.
        """
        future: Future = Future()
        with self._cond:
            if self._stop:
                raise RuntimeError("the ingest worker has stopped")
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future

    def offer(self, frame: PendingFrame) -> None:
        """Hand a received frame to the worker (never blocks on the model)."""
        replaced = None
        with self._cond:
            self._stats.received += 1
            last = self._last_offered.get(frame.camera, -math.inf)
            period = 1.0 / self.sample_rate_hz if self.sample_rate_hz > 0 else 0.0
            if frame.stamp_s - last < period - 1e-3 and frame.stamp_s >= last:
                outcome = "sampled_out"
            else:
                outcome = None
                self._last_offered[frame.camera] = frame.stamp_s
                replaced = self._pending.get(frame.camera)
                self._pending[frame.camera] = frame
                self._cond.notify_all()
            if outcome:
                self._stats.outcomes[outcome] += 1
            if replaced is not None:
                self._stats.outcomes["dropped"] += 1
        if outcome:
            self._on_done(frame, outcome, "")
        if replaced is not None:
            self._on_done(replaced, "dropped", "a newer frame arrived before ingest")

    def resume(self, origin_s: float) -> None:
        """Continue a stream loaded from a memory file: its stamp origin (ROS seconds of stream
        time 0); each camera's order goes on from the session's ``camera_stamps``."""
        with self._cond:
            self._stats.origin_s = origin_s

    def add_pose(self, stamp_s: float, pose: Pose | None, problem: str = "") -> None:
        """A pose message (ROS seconds), or its refusal (``pose`` None, ``problem`` why): the
        frames waiting for it take it (called from the subscription's thread; cheap)."""
        with self._cond:
            self._stats.poses_received += 1
            if pose is None:
                self._stats.poses_refused += 1
                self._stats.last_error = f"pose refused: {problem}"
                return
            if self.poses is None:
                return
            updates = self.poses.add_pose(stamp_s, pose)
        for frame_id, matched in updates:
            self.session.set_frame_pose(frame_id, matched)

    def reject(self, frame: PendingFrame, outcome: str, detail: str) -> None:
        """Count and report a frame the caller refused instead of offering it (``bad_stamp``)."""
        with self._cond:
            self._stats.received += 1
        self._finish(frame, outcome, detail, taken=False)

    def _take(self) -> PendingFrame | None:
        while True:
            with self._cond:
                while not self._pending and not self._jobs and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for _, future in self._jobs:
                        future.set_exception(RuntimeError("the ingest worker has stopped"))
                    return None
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    break
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed to the caller, who decides
                    future.set_exception(exc)
        with self._cond:
            camera = min(self._pending, key=lambda c: self._pending[c].stamp_s)  # oldest camera first
            self._busy = True
            return self._pending.pop(camera)

    def _finish(
        self, frame: PendingFrame, outcome: str, detail: str = "", result=None, ms: float = 0.0, taken: bool = True
    ):
        with self._cond:
            if taken:
                self._busy = False
            s = self._stats
            s.outcomes[outcome] += 1
            if outcome in BAD_OUTCOMES:
                s.last_error = f"{frame.camera} @ {frame.stamp_s:.3f}s: {detail}"
            if result is not None:
                n = s.outcomes["ingested"]
                self._ingest_ms_sum += ms
                s.last_ingest_ms, s.mean_ingest_ms = ms, self._ingest_ms_sum / n
                s.last_vision_ms, s.last_prefill_ms = result.vision_ms, result.prefill_ms
                s.evicted_tokens += result.evicted_tokens
                s.stored += result.stored
        if outcome in BAD_OUTCOMES:
            self._log(f"frame {outcome}: {frame.camera} @ {frame.stamp_s:.3f}s: {detail}")
        self._on_done(frame, outcome, detail)

    def _run(self) -> None:
        while (frame := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                rgb = to_rgb(frame.msg, frame.compressed, self.max_frame_pixels)
            except FrameTooLarge as exc:
                self._finish(frame, "too_large", str(exc))
                continue
            except FrameError as exc:
                self._finish(frame, "rejected", str(exc))
                continue
            thumb = thumbnail(rgb)
            last = self._last_thumb.get(frame.camera)
            if (
                self.duplicate_threshold > 0
                and last is not None
                and frame_difference(thumb, last) < self.duplicate_threshold
            ):
                self._finish(frame, "duplicate")
                continue
            origin = self._stats.origin_s if not math.isnan(self._stats.origin_s) else frame.stamp_s
            t = frame.stamp_s - origin  # stream time, compared as the session compares it
            newest = self.session.camera_stamps.get(frame.camera, -math.inf)
            if t < newest:
                if newest - t <= self.clock_reset_s:
                    self._finish(
                        frame, "late", f"older than camera {frame.camera!r}'s newest frame ({origin + newest:.3f}s)"
                    )
                    continue
                self.session.restart_camera(frame.camera)
                with self._cond:
                    self._stats.clock_resets += 1
                self._log(
                    f"camera {frame.camera!r}: clock jumped back {newest - t:.3f}s (from {origin + newest:.3f}s "
                    f"to {frame.stamp_s:.3f}s); its frame order restarts, memory is kept"
                )
            try:
                result = self.session.ingest_frame(rgb, t, frame.camera)
            except ValueError as exc:  # a frame the model cannot take (e.g. smaller than 8x8)
                self._finish(frame, "rejected", str(exc))
                continue
            except Exception as exc:  # the model failed: keep the node alive, say what happened
                self._finish(frame, "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                continue
            with self._cond:
                if math.isnan(self._stats.origin_s):
                    self._stats.origin_s = origin
                pose = self.poses.add_frame(result.frame_id, frame.stamp_s) if self.poses and result.stored else None
            if pose is not None:
                self.session.set_frame_pose(result.frame_id, pose)
            self._last_thumb[frame.camera] = thumb
            self._finish(frame, "ingested", result=result, ms=(time.perf_counter() - t0) * 1e3)
