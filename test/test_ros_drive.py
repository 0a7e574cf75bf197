"""The 5-minute replayed drive: `infmllm-demo` end to end as separate processes
(make-bag with odometry -> node -> replay with a question per event -> SIGINT), checked from its
report."""

import json

import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)

from infmllm_ros.tools.processes import ros_env, run_tool
from infmllm_ros.tools.replay import rss_growth


def test_five_minute_drive_is_replayed_without_drops_and_with_flat_memory(tmp_path):
    out = tmp_path / "demo"
    # The drawn road background keeps the test independent of ../shared (the demo uses the dashcam).
    run = run_tool("infmllm-demo", ["--out", out, "--minutes", "5", "--video", ""], ros_env(), timeout_s=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["node_outcomes"] == {"ingested": 300} and report["frames_unacked"] == 0
    manifest = json.loads((out / "drive.manifest.json").read_text())
    # six events (one of them shown twice, asked about once), a time window, six absent objects
    assert len(manifest["events"]) == 7 and len(report["answers"]) == 6 + 1 + 6 == 13
    assert all(a["success"] and a["tokens_in_cache"] <= 1024 + 64 for a in report["answers"])
    assert report["answers_published"] == 13 and report["degenerate"] == 0  # answers do not loop
    assert len(report["repeated_all_timed"]) == 1 and len(report["window_correct"]) == 1
    assert report["answers_from_model"] + report["answers_from_evidence"] == 13
    assert report["absent_correct"] is not None and report["accuracy"] is not None
    # where: the bag's odometry reached the node, each event has its place, every event answer states one
    assert all(len(e["position"]) == 2 for e in manifest["events"])
    events = [a for a in report["answers"] if "position_error_m" in a]
    assert len(events) == 6 and report["positions_unknown"] == 0 and report["answers_stating_position"] >= 6
    assert all(a["states_position"] for a in events) and report["position_error_m_median"] <= 2.0
    # Streaming memory after the cache has filled (minute 2 on): flat within 5%.
    mem = rss_growth(report["diagnostics"], start_s=120, end_s=300)
    assert abs(mem["rss_growth"]) < 0.05, mem
    assert "node stopped with exit status 0" in run.stdout
