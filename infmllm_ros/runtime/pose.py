"""Where the robot was: a stored frame's pose, checked, and matched to frames by stamp.

ReMEmbR (NVIDIA's robot memory) keeps a position and a time with every caption; here every
stored frame keeps the robot's pose nearest its stamp (within a tolerance), beside its camera and
label in the stream's per-frame records, so an answer can say where as well as when.

Poses come from odometry or a pose topic at 10-200 Hz and frames at ~1-10 Hz, in any order (a
bag interleaves topics, and a pose can arrive after the frame it belongs to). :class:`PoseMatcher`
keeps the poses of the last ``horizon_s`` seconds and the frames still waiting for a better
pose, both bounded, and gives each frame the pose nearest its stamp as soon as it knows it.
No rclpy here: the node converts messages to :class:`Pose` (:mod:`infmllm_ros.ros.poses`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import astuple, dataclass

#: Largest coordinate accepted (metres): a pose further out is a broken message, not a robot.
MAX_COORDINATE_M = 1e6
#: How far a quaternion's norm may be from 1 before the pose is refused.
QUATERNION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Pose:
    """A pose in a named frame: position (metres) and orientation (unit quaternion x, y, z, w).

    Raises:
        ValueError: a NaN or infinite field, a coordinate beyond :data:`MAX_COORDINATE_M`, or a
            quaternion whose norm is not 1 within :data:`QUATERNION_TOLERANCE` (the message says which).
    """

    x: float
    y: float
    z: float = 0.0
    qx: float = 0.0
    qy: float = 0.0
    qz: float = 0.0
    qw: float = 1.0
    frame_id: str = ""

    def __post_init__(self):
        numbers = astuple(self)[:7]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError(f"pose has a NaN or infinite field: {numbers}")
        if max(abs(self.x), abs(self.y), abs(self.z)) > MAX_COORDINATE_M:
            raise ValueError(f"pose position ({self.x:g}, {self.y:g}, {self.z:g}) m is beyond {MAX_COORDINATE_M:g} m")
        norm = math.sqrt(self.qx**2 + self.qy**2 + self.qz**2 + self.qw**2)
        if abs(norm - 1.0) > QUATERNION_TOLERANCE:
            raise ValueError(f"pose orientation is not a unit quaternion (norm {norm:.4f})")

    def to_list(self) -> list:
        """JSON-ready ``[x, y, z, qx, qy, qz, qw, frame_id]`` (:meth:`from_list` reads it)."""
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: list | None) -> Pose | None:
        """The pose of :meth:`to_list`'s list; None for None."""
        return None if values is None else cls(*values)

    def distance_to(self, x: float, y: float) -> float:
        """Planar distance (metres) from this pose to ``(x, y)``."""
        return math.hypot(self.x - x, self.y - y)


class PoseMatcher:
    """Gives each stored frame the pose nearest its stamp, within ``tolerance_s``, whichever
    arrives first.

    Args:
        tolerance_s: largest |frame stamp - pose stamp| accepted (seconds, > 0).
        horizon_s: poses older than the newest pose by more than this are dropped (seconds;
            default ``max(10, 4 * tolerance_s)``): memory stays bounded at any pose rate.
        max_pending: most frames kept waiting for a pose (the oldest are given up).

    Attributes:
        matched: frames that have been given a pose (each counted once, at its first pose).

    Raises:
        ValueError: a tolerance or horizon that is not a finite number > 0.
    """

    def __init__(self, tolerance_s: float, horizon_s: float | None = None, max_pending: int = 4096):
        horizon_s = max(10.0, 4 * tolerance_s) if horizon_s is None else horizon_s
        if not (math.isfinite(tolerance_s) and tolerance_s > 0 and math.isfinite(horizon_s) and horizon_s > 0):
            raise ValueError(f"pose tolerance ({tolerance_s}) and horizon ({horizon_s}) must be seconds > 0")
        self.tolerance_s, self.horizon_s, self.max_pending = float(tolerance_s), float(horizon_s), max_pending
        self._stamps: list[float] = []  # sorted
        self._poses: list[Pose] = []
        self._pending: dict[int, tuple[float, float]] = {}  # frame id -> (stamp, |dt| of its pose so far)
        self.matched = 0

    def __len__(self) -> int:
        """Poses held."""
        return len(self._stamps)

    @property
    def pending(self) -> int:
        """Frames still waiting for a (better) pose."""
        return len(self._pending)

    def nearest(self, stamp_s: float) -> tuple[Pose, float] | None:
        """The held pose nearest ``stamp_s`` within the tolerance and its |dt| (seconds), or None."""
        i = bisect.bisect_left(self._stamps, stamp_s)
        best = None
        for j in (i - 1, i):
            if 0 <= j < len(self._stamps):
                dt = abs(self._stamps[j] - stamp_s)
                if dt <= self.tolerance_s and (best is None or dt < best[1]):
                    best = (self._poses[j], dt)
        return best

    def add_frame(self, frame_id: int, stamp_s: float) -> Pose | None:
        """A stored frame: its pose so far (None when none is near yet). It waits for a nearer
        pose until poses newer than its stamp + tolerance have arrived."""
        found = self.nearest(stamp_s)
        self.matched += found is not None
        if not (self._stamps and self._stamps[-1] >= stamp_s + self.tolerance_s):
            self._pending[frame_id] = (stamp_s, found[1] if found else math.inf)
            while len(self._pending) > self.max_pending:
                del self._pending[next(iter(self._pending))]
        return found[0] if found else None

    def add_pose(self, stamp_s: float, pose: Pose) -> list[tuple[int, Pose]]:
        """A pose: held for later frames, and returned for each waiting frame it is the nearest
        pose of so far (``(frame_id, pose)``; the caller updates those frames)."""
        i = bisect.bisect_right(self._stamps, stamp_s)
        self._stamps.insert(i, stamp_s)
        self._poses.insert(i, pose)
        cut = bisect.bisect_left(self._stamps, self._stamps[-1] - self.horizon_s)
        if cut:
            del self._stamps[:cut], self._poses[:cut]
        updates = []
        newest = self._stamps[-1]
        for frame_id, (frame_s, best_dt) in list(self._pending.items()):
            dt = abs(stamp_s - frame_s)
            if dt <= self.tolerance_s and dt < best_dt:
                updates.append((frame_id, pose))
                self.matched += best_dt == math.inf  # its first pose
                self._pending[frame_id] = (frame_s, dt)
            if newest >= frame_s + self.tolerance_s or newest - frame_s > self.horizon_s:
                del self._pending[frame_id]  # no nearer pose can come
        return updates
