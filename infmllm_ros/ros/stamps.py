"""ROS time <-> float seconds, and which header stamps a frame may carry."""

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


def stamp_problem(stamp, now_s: float, max_skew_s: float) -> str:
    """Why a header ``stamp`` (``builtin_interfaces/Time``) cannot be a frame's time, or "".

    Refused: ``nanosec`` outside 0..999999999 (it would move the stamp by whole seconds), a
    negative ``sec``, and, when ``max_skew_s > 0`` and the node clock runs (``now_s > 0``; sim
    time reads 0 until ``/clock`` arrives), a stamp more than ``max_skew_s`` seconds ahead of
    ``now_s``. A stamp in the past is fine: bags replay old drives.
    """
    if not 0 <= stamp.nanosec <= 999_999_999:
        return f"nanosec {stamp.nanosec} is outside 0..999999999"
    if stamp.sec < 0:
        return f"negative stamp sec={stamp.sec}"
    ahead = stamp_seconds(stamp) - now_s
    if max_skew_s > 0 and now_s > 0 and ahead > max_skew_s:
        return (
            f"stamp {stamp_seconds(stamp):.3f}s is {ahead:.1f}s ahead of the node clock ({now_s:.3f}s; "
            f"max_stamp_skew_s={max_skew_s:g})"
        )
    return ""
