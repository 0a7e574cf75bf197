"""The limits as shipped, over real DDS on loopback: one node with ``config/desktop.yaml`` as it
ships (best-effort keep-last-1 cameras, ``max_camera_rate_hz``), publishers in their own
processes with a camera driver's default (reliable) QoS (:mod:`infmllm_ros.bench.limits`).

Raw 4K rgb8 and bgra8 frames arrive and are ingested (best effort: all of them alone, more than
half under load); a raw frame far over the limits is filtered out by DDS before it is sent
(< 50 MiB of memory); a rear camera flooding 8x8 frames at 500 Hz neither slows answers past three
times their idle latency nor costs the 1 Hz front camera a frame, and its
surplus is counted per camera in ``/diagnostics``.
"""

import re
import statistics
import time

import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)

from infmllm_ros.bench.limits import flood, memory_kib, raw_frames, shipped_node
from infmllm_ros.ros.intake import size_filter


@pytest.mark.parametrize("limit", [64, 4096 * 4096, 1920 * 1080, 12_000_000])
def test_the_size_filter_passes_every_frame_within_the_limit_and_none_over_twice_it(limit):
    options = size_filter(limit)
    params = [int(p) for p in options.expression_parameters]
    bands = [
        (params[int(a)], params[int(b)])
        for a, b in re.findall(r"height <= %(\d+) AND width <= %(\d+)", options.filter_expression)
    ]
    assert len(options.expression_parameters) <= 100  # DDS caps a filter's parameters

    def passes(w, h):
        return any(h <= max_h and w <= max_w for max_h, max_w in bands)

    sides = sorted(
        {8, 9, 15, 16, 17, 100, 480, 640, 1080, 1920, 2160, 3840, 4096, 5000, 8000, 20000, limit // 8}
        | {limit // s for s in (8, 9, 16, 640, 1080, 4096) if limit // s >= 8}
    )
    for w in sides:
        for h in sides:
            if w * h <= limit:
                assert passes(w, h), (w, h)
            if w * h > 2 * limit:
                assert not passes(w, h), (w, h)


@pytest.fixture(scope="module")
def shipped():
    with shipped_node() as (env, pid, front):
        assert front.send_front() == "ingested"
        yield env, pid, front


def test_raw_4k_rgb8_and_bgra8_frames_arrive_at_the_shipped_best_effort_qos(shipped):
    env, _, front = shipped
    # without its shared-memory segment the node can only lose them: say why at once
    deadline = time.monotonic() + 10
    while "dds_shared_memory" not in front.status and time.monotonic() < deadline:
        time.sleep(0.1)
    assert front.status.get("dds_shared_memory") == "on"
    before = dict(front.status)
    outcomes = raw_frames(env, front, "4k", 10, wait_s=15.0)
    # Best effort sends a frame once: one lost on the way stays lost. Alone, 10 of 10 arrive
    # (bench/results/README.md, "Limits as shipped"); on a loaded 2-core CI machine 7 of 10 did.
    # What this guards against lost all or all but one: no shared-memory segment (0 of 10), the
    # transport's default port queue (1 of 10). The node's counters say whether a lost frame
    # reached its subscription at all.
    reached = {
        key: int(front.status.get(key, 0)) - int(before.get(key, 0))
        for key in ("camera_rear_read", "camera_rear_unread")
    }
    assert set(outcomes) <= {"ingested", None}, outcomes
    assert outcomes.count("ingested") > len(outcomes) / 2, (outcomes, reached)


def test_a_183_mib_raw_frame_is_filtered_out_before_it_is_sent(shipped):
    env, pid, front = shipped
    before = memory_kib(pid)
    # never reaches the node's callback: a frame the node takes is reported within a second or
    # two (a 4K frame, above), so 15 s after its publisher has sent it, it is not coming
    assert raw_frames(env, front, "oversized", 1, wait_s=15.0) == [None]
    after = memory_kib(pid)
    assert after["RssAnon"] + after["RssShmem"] - before["RssAnon"] - before["RssShmem"] < 50 * 1024
    assert front.send_front() == "ingested"


def test_a_flooding_camera_neither_slows_answers_nor_starves_the_other_camera(shipped):
    env, pid, front = shipped
    before = statistics.median([front.ask() for _ in range(3)])
    result = flood(env, front, pid, hz=500.0, seconds=16.0)
    assert None not in result["latencies_s"]
    # An answer's time follows its length, which follows what memory holds (the front camera shows
    # a cat every 5 s): idle is timed before and after the flood, and the longer one is the bar.
    # 1.5-2x idle as shipped (bench/results/README.md, "Limits as shipped"); before the intake had
    # its own paced thread, 56x
    idle = max(before, statistics.median([front.ask() for _ in range(3)]))
    assert statistics.median(result["latencies_s"]) <= 3 * idle, (before, idle, result["latencies_s"])
    assert result["front_ingested"] == result["front_sent"] >= 10, result["front_outcomes"]
    assert result["rear_unread"] > result["rear_sent"] / 2 and result["rear_read"] < 25 * 16
    assert front.status["camera_front_unread"] == "0"
