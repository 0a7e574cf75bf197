"""The node's ROS interface as data, shared by the node and its clients (``infmllm_interfaces``)."""

#: The fields an ``Ask`` service response shares with the ``Answer`` message (the action's result).
ANSWER_FIELDS = (
    "answer",
    "first_frame_stamp",
    "last_frame_stamp",
    "frames_in_context",
    "tokens_in_cache",
    "latency_s",
    "sighting_stamps",
    "sighting_scores",
    "sighting_cameras",
    "sighting_poses",
    "sighting_pose_known",
    "pose_frame_id",
    "seen",
    "confidence",
    "verdict",
    "answer_source",
    "evidence",
    "stopped",
)
