"""The limits as shipped, over real DDS on loopback: one node with ``config/desktop.yaml`` as it
ships (best-effort keep-last-1 cameras, ``max_camera_rate_hz``), publishers in their own
processes with a camera driver's default (reliable) QoS (:mod:`infmllm_ros.bench.limits`).

Raw 4K rgb8 and bgra8 frames all arrive and are ingested; a raw frame far over the limits never
reaches the model and costs at most one copy of itself; a rear camera flooding 8x8 frames at 500 Hz
neither slows answers past twice their idle latency nor costs the front camera a frame, and its
surplus is counted per camera in ``/diagnostics``.
"""
import statistics

import pytest

import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)

from infmllm_ros.bench.limits import flood, memory_kib, raw_frames, shipped_node


@pytest.fixture(scope="module")
def shipped():
    with shipped_node() as (env, pid, front):
        assert front.send_front() == "ingested"
        yield env, pid, front


def test_raw_4k_rgb8_and_bgra8_frames_arrive_at_the_shipped_best_effort_qos(shipped):
    env, _, front = shipped
    assert raw_frames(env, front, "4k", 10) == ["ingested"] * 10


def test_a_183_mib_raw_frame_never_reaches_the_model_and_costs_at_most_one_copy(shipped):
    env, pid, front = shipped
    before = memory_kib(pid)["RssAnon"]
    assert raw_frames(env, front, "oversized", 1) != ["ingested"]
    assert memory_kib(pid)["RssAnon"] - before < 1.2 * 8000 * 8000 * 3 / 1024
    assert front.send_front() == "ingested"


def test_a_flooding_camera_neither_slows_answers_nor_starves_the_other_camera(shipped):
    env, pid, front = shipped
    idle = statistics.median([front.ask() for _ in range(3)])
    result = flood(env, front, pid, hz=500.0, seconds=16.0)
    assert None not in result["latencies_s"]
    assert statistics.median(result["latencies_s"]) <= 2 * idle, (idle, result["latencies_s"])
    assert result["front_ingested"] == result["front_sent"] >= 10, result["front_outcomes"]
    assert result["rear_unread"] > result["rear_sent"] / 2 and result["rear_read"] < 25 * 16
    assert front.status["camera_front_unread"] == "0"
