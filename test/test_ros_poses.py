"""Where, over real DDS on loopback: a node with ``pose_topic`` gives each stored frame the
odometry pose nearest its stamp and says where in its answers; a pose that never comes leaves the
position unknown; broken poses are refused and counted; a 200 Hz pose stream leaves the node's
memory flat."""

import math

import numpy as np
import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
from builtin_interfaces.msg import Time
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from infmllm_ros.tools.ask import call_ask
from infmllm_ros.tools.processes import ros_env, start_node, stop_node
from ros_graph import Graph, jpeg, one_camera

TOPIC, ODOM = "/posetest/front/image_raw/compressed", "/posetest/odom"
T0 = 1_700_000_000


def odometry(t: float, x: float, y: float, qw: float = 1.0) -> Odometry:
    msg = Odometry(header=Header(stamp=Time(sec=int(t), nanosec=int(round((t % 1) * 1e9))), frame_id="odom"))
    msg.pose.pose.position.x, msg.pose.pose.position.y, msg.pose.pose.orientation.w = x, y, qw
    return msg


@pytest.fixture(scope="module")
def posed(tmp_path_factory):
    """A node watching a camera and its odometry: ``(graph, process)``."""
    env = ros_env()
    tmp = tmp_path_factory.mktemp("poses")
    proc, _ = start_node(
        tmp,
        env,
        one_camera(
            TOPIC, {"max_new_tokens": 16, "pose_topic": ODOM, "pose_tolerance_s": 0.2, "diagnostics_period_s": 0.5}
        ),
    )
    g = Graph(env, {"camera": (CompressedImage, TOPIC), "odom": (Odometry, ODOM)})
    try:
        yield g, proc
    finally:
        g.close()
        stop_node(proc)


def publish_odometry(g, messages, per_s: float = 500.0) -> None:
    """Publish ``messages`` once the node subscribes, ``per_s`` a second (in bursts of 20): fast,
    and slow enough that the reliable queues lose none."""
    import time

    deadline = time.monotonic() + 30
    while g.odom.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    for i, msg in enumerate(messages):
        g.odom.publish(msg)
        if i % 20 == 19:
            time.sleep(max(0.0, t0 + (i + 1) / per_s - time.monotonic()))


def ingest(g, msg) -> None:
    """Publish a frame until the node reports it ingested."""
    assert g.publish_and_wait(g.camera, msg, timeout_s=60) == "ingested"


def test_answers_say_where_a_frame_was_seen_and_unknown_where_no_pose_came(posed):
    from skimage.data import chelsea, coffee

    g, _ = posed
    publish_odometry(g, [odometry(T0 + 0.01 * i, 0.1 * i, -4.0) for i in range(0, 50)])  # t0 .. t0+0.49 s
    ingest(g, jpeg(np.full((120, 160, 3), 60, np.uint8), T0))
    ingest(g, jpeg(chelsea(), T0 + 10))
    publish_odometry(g, [odometry(T0 + 10 + 0.05 * i, 30.0 + 0.05 * i, -4.0) for i in range(-4, 8)])  # after it
    ingest(g, jpeg(coffee(), T0 + 40))  # no pose near t0+40 s ever
    status = g.status_when(lambda s: int(s["frames_with_pose"]) >= 2)
    assert int(status["frames_with_pose"]) == 2 and int(status["poses_received"]) == 50 + 12
    cat = call_ask(g.node, "/ask", "Where did you see a cat?", 16)
    assert cat.success and cat.sighting_pose_known[0] and cat.pose_frame_id == "odom"
    assert abs(cat.sighting_poses[0].position.x - 30.0) < 1e-6 and cat.sighting_poses[0].position.y == -4.0
    assert cat.evidence == "Memory: I saw a domestic cat at t=10 s, near (30.0, -4.0) in odom."
    espresso = call_ask(g.node, "/ask", "Was there an espresso?", 16)
    assert espresso.success and not espresso.sighting_pose_known[0]
    assert espresso.evidence.endswith("at t=40 s, position unknown.")


def test_broken_poses_are_refused_and_counted_and_the_node_goes_on(posed):
    g, proc = posed
    before = int(g.latest_status()["poses_refused"])
    publish_odometry(
        g,
        [
            odometry(T0 + 50, math.nan, 0.0),
            odometry(T0 + 50.1, 2e6, 0.0),
            odometry(T0 + 50.2, 1.0, 0.0, qw=0.5),
            odometry(T0 + 50.3, math.inf, 0.0),
        ],
    )
    status = g.status_when(lambda s: int(s["poses_refused"]) >= before + 4)
    assert int(status["poses_refused"]) == before + 4 and "pose refused" in status["last_error"]
    assert proc.poll() is None


def test_poses_at_200_hz_keep_the_nodes_memory_flat(posed):
    """Half a minute of 200 Hz odometry in real time (6,000 poses) after a first 15 s, each longer
    than the matcher's 10 s horizon: the node takes 95% or more of them (keep-last queues may drop
    a few when the test machine is busy) and its RSS stays within 5% of what it was after the
    first 15 s. Ten minutes at 200 Hz through the matcher alone: ``test_pose.py``."""
    g, _ = posed
    start, rate = T0 + 100, 200
    publish_odometry(g, [odometry(start + i / rate, 0.01 * i, 0.0) for i in range(rate * 15)], per_s=rate)
    first = g.status_when(lambda s: int(s["poses_received"]) >= rate * 15, timeout_s=30)
    rss0, received0 = float(first["rss_mib"]), int(first["poses_received"])
    sent = rate * 30
    publish_odometry(g, [odometry(start + 15 + i / rate, 0.01 * i, 0.0) for i in range(sent)], per_s=rate)
    status = g.status_when(lambda s: int(s["poses_received"]) >= received0 + 0.95 * sent, timeout_s=30)
    assert int(status["poses_received"]) >= received0 + 0.95 * sent, (received0, status["poses_received"])
    assert float(status["rss_mib"]) <= 1.05 * rss0, (rss0, status["rss_mib"])
