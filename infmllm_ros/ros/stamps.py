"""ROS time <-> float seconds, for the node and the replay tool."""
from __future__ import annotations

import math

from builtin_interfaces.msg import Time


def to_time(seconds: float) -> Time:
    """Seconds (float, >= 0) -> ``builtin_interfaces/Time``; NaN -> zero time."""
    if not math.isfinite(seconds) or seconds < 0:
        return Time()
    sec = int(seconds)
    return Time(sec=sec, nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def stamp_seconds(stamp) -> float:
    """``builtin_interfaces/Time`` -> float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9
