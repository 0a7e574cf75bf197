"""Pose messages -> :class:`~infmllm_ros.runtime.pose.Pose` with their stamp (ROS seconds).

``nav_msgs/Odometry`` (``pose.pose``) and ``geometry_msgs/PoseStamped`` (``pose``), each with its
header's stamp and frame id. A message that cannot be a robot's pose (NaN, infinite, beyond
1e6 m, a quaternion that is not unit, a malformed stamp) raises ValueError; the node counts it
as ``poses_refused`` and keeps running.
"""

from __future__ import annotations

from ..runtime.pose import Pose
from .stamps import stamp_problem, stamp_seconds

#: ``pose_msg_type`` parameter value -> (message module, class name, path to its Pose).
POSE_MESSAGES = {
    "odometry": ("nav_msgs.msg", "Odometry", ("pose", "pose")),
    "pose_stamped": ("geometry_msgs.msg", "PoseStamped", ("pose",)),
}


def message_class(kind: str):
    """The ROS message class of ``pose_msg_type`` ``kind``.

    Raises:
        ValueError: an unknown kind. ImportError: its message package is not installed.
    """
    if kind not in POSE_MESSAGES:
        raise ValueError(f"pose_msg_type {kind!r}: one of {sorted(POSE_MESSAGES)}")
    module, name, _ = POSE_MESSAGES[kind]
    return getattr(__import__(module, fromlist=[name]), name)


def to_pose(msg, kind: str) -> tuple[float, Pose]:
    """``(stamp seconds, Pose)`` of a pose message of ``kind``.

    Raises:
        ValueError: the stamp or the pose is refused (the message says why).
    """
    problem = stamp_problem(msg.header.stamp, 0.0, 0.0)
    if problem:
        raise ValueError(f"pose stamp refused: {problem}")
    pose = msg
    for attr in POSE_MESSAGES[kind][2]:
        pose = getattr(pose, attr)
    p, q = pose.position, pose.orientation
    return stamp_seconds(msg.header.stamp), Pose(
        float(p.x), float(p.y), float(p.z), float(q.x), float(q.y), float(q.z), float(q.w), msg.header.frame_id
    )


def to_pose_msg(pose: Pose | None):
    """A ``geometry_msgs/Pose`` of ``pose`` (the zero pose for None: see ``sighting_pose_known``)."""
    from geometry_msgs.msg import Point, Quaternion
    from geometry_msgs.msg import Pose as PoseMsg

    if pose is None:
        return PoseMsg()
    return PoseMsg(
        position=Point(x=pose.x, y=pose.y, z=pose.z), orientation=Quaternion(x=pose.qx, y=pose.qy, z=pose.qz, w=pose.qw)
    )
