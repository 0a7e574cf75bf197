"""infmllm-bench-needle: bad input is a clear error; a one-minute drive runs end to end."""

import json

import cv2
import numpy as np
import pytest
from skimage.data import chelsea

from infmllm_ros.bench.needle import main


@pytest.fixture
def clip(tmp_path):
    path = tmp_path / "road.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(20):
        img = np.full((120, 160, 3), 90, np.uint8)
        img[:50] = (210, 170, 135)
        cv2.line(img, (80, 50), (20 + i, 119), (240, 240, 240), 3)
        out.write(img)
    out.release()
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--video", "/nonexistent.mp4"], "video not found"),
        (["--policy", "lru"], "unknown KV-cache policy 'lru'"),
        (["--events", "/nonexistent_dir"], "events folder not found"),
        (["--decay", "1.5"], "decay must be in [0, 1]"),
        (["--vision-budget", "-4"], "vision_budget must be >= 0 tokens, got -4"),
        (["--familiar-interval", "-1"], "--familiar-interval must be >= 0"),
        (["--device", "cuda:64"], "device 'cuda:64' asked for, but this machine has"),
        (["--device", "gpu0"], "unknown torch device 'gpu0'"),
    ],
)
def test_bad_input(tmp_path, clip, capsys, args, message):
    base = ["--video", str(clip), "--json", str(tmp_path / "o.json")]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err


def test_one_minute_drive(tmp_path, clip):
    events = tmp_path / "events"
    events.mkdir()
    cv2.imwrite(str(events / "cat.png"), cv2.cvtColor(chelsea(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "needle.json"
    code = main(
        [
            "--video",
            str(clip),
            "--events",
            str(events),
            "--minutes",
            "1",
            "--fps",
            "0.5",
            "--policy",
            "streaming_llm",
            "--capacity",
            "256",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    run = json.loads(out.read_text())["runs"]["streaming_llm@256,1min"]
    assert [a["label"] for a in run["answers"]] == ["cat"]
    cat = run["answers"][0]  # its best sighting (if any survived) is a frame of this drive, scored
    assert cat["seen_at_s"] is None or 0 <= cat["seen_at_s"] < 60
    assert run["recalled"] == float(cat["recalled"]) and len(run["absent_seen_scores"]) == 6
    assert 0 <= run["absent_named"] <= 1 and len(run["absent_answers"]) == 6 and len(run["absent_seen"]) == 6
    assert 0 <= run["absent_correct"] <= 1 and run["degenerate"] == 0 and run["hallucinated"] >= 0
    # the cat's near miss is asked too, and every answer records its verdict and the source of its text
    assert [(x["event"], x["object"]) for x in run["near_miss"]] == [("cat", "dog")]
    assert {cat["verdict"], *(x["verdict"] for x in run["absent_verdicts"])} <= {"seen", "not seen", "undecided"}
    assert cat["answer_source"] in ("model", "evidence") and run["repeated_all_timed"] == []
    assert run["ingest_ms_median"] > 0 and run["overflow"] is None and len(run["rss_mib_per_minute"]) >= 1
    assert (
        "| 1 | 0 | streaming_llm | 256 | 64 | 0 |" in out.with_suffix(".md").read_text()
    )  # seed 0, slack 64, no budget
    # familiar frames are stored once per 10 s: 30 frames, at most 1 + 30 / 5 written
    assert run["vision_budget"] == 0 and run["frames_stored"] <= 7 and run["stored_ms_median"] > 0
    assert out.with_suffix(".png").stat().st_size > 0 and len(run["ingest_ms_median_per_minute"]) == 1
    # --resume keeps that run and adds the next one to the same grid.
    stamp = out.stat().st_mtime_ns
    assert (
        main(
            [
                "--video",
                str(clip),
                "--events",
                str(events),
                "--minutes",
                "1",
                "--fps",
                "0.5",
                "--policy",
                "streaming_llm,h2o",
                "--capacity",
                "256",
                "--json",
                str(out),
                "--resume",
                "--vision-budget",
                "16",
            ]
        )
        == 0
    )
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"streaming_llm@256,1min", "h2o+vb16@256,1min"} and out.stat().st_mtime_ns > stamp
    assert (
        runs["h2o+vb16@256,1min"]["vision_budget"] == 16
        and "| 1 | 0 | h2o | 256 | 64 | 16 |" in out.with_suffix(".md").read_text()
    )
    assert runs["streaming_llm@256,1min"] == run


def test_with_poses_each_event_answer_is_scored_for_where(tmp_path, clip):
    events = tmp_path / "events"
    events.mkdir()
    cv2.imwrite(str(events / "cat.png"), cv2.cvtColor(chelsea(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "needle.json"
    assert (
        main(
            [
                "--video",
                str(clip),
                "--events",
                str(events),
                "--minutes",
                "1",
                "--fps",
                "0.5",
                "--policy",
                "inf_mllm",
                "--capacity",
                "512",
                "--novelty-threshold",
                "0",
                "--poses",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads(out.read_text())["runs"]["inf_mllm+vb128@512,1min,novelty0,poses"]
    cat = run["answers"][0]
    assert run["poses"] and cat["position"] is not None and cat["seen_at_position"] is not None
    if cat["seen_at_s"] == cat["time_s"]:  # the sighting is the event's frame: where it was, to the odometry's step
        assert cat["position_error_m"] < 0.6
    assert (
        cat["states_position"] == ("near (" in cat["answer"])
        and "position error m" in out.with_suffix(".md").read_text()
    )


def test_a_full_cache_that_overflows_is_reported_without_answers(tmp_path):
    """A full cache too small for the drive stops at the frame that does not fit; the question
    would not fit either, so the run records the overflow and no scores instead of crashing."""
    from infmllm_ros.bench.drive import Drive
    from infmllm_ros.bench.needle import merge_run, report, run_drive
    from infmllm_ros.models import load_model
    from infmllm_ros.runtime.session import open_session

    road = np.full((120, 160, 3), 90, np.uint8)
    drive = Drive(lambda t: road, 1, 0.5, {"cat": (chelsea(), ("cat",))}, at={"cat": 10.0})
    session = open_session(load_model("smollm2-135m"), capacity=96, policy="full", max_chunk=64)
    run = run_drive(session, drive, log_every=0)
    assert run["overflow"].startswith("full cache ran out at t=") and run["answers"] == []
    assert run["accuracy"] is None and run["ttft_s_median"] is None and run["absent_answers"] == []
    assert 0 < len(run["ingest_ms_median_per_minute"]) and run["ingest_ms_median"] > 0
    out = tmp_path / "needle.json"
    data = merge_run(
        out,
        {"machine": {"cpu": "test", "cores": 1}},
        "full@96,1min",
        {"policy": "full", "capacity": 96, "minutes": 1, "manifest": drive.manifest(), **run},
    )
    report(data, out)
    assert "| 1 |  | full | 96 | 0 | 0 | n/a |" in out.with_suffix(".md").read_text()  # no seed recorded


def test_the_retrieval_baseline_answers_from_an_unbounded_index_by_the_same_rule(tmp_path, clip):
    """--policy index: no frame enters the KV cache, every frame is indexed; the cat is found by
    the same verdict rule and its memory is the index's bytes, not the cache's."""
    from infmllm_ros.bench.retrieval import RetrievalSession
    from infmllm_ros.models import load_model

    events = tmp_path / "events"
    events.mkdir()
    cv2.imwrite(str(events / "cat.png"), cv2.cvtColor(chelsea(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "needle.json"
    assert (
        main(
            [
                "--video",
                str(clip),
                "--events",
                str(events),
                "--minutes",
                "1",
                "--fps",
                "0.5",
                "--policy",
                "index",
                "--capacity",
                "256",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    run = json.loads(out.read_text())["runs"]["index@256,1min"]
    (cat,) = run["answers"]
    assert cat["verdict"] == "seen" and cat["seen_at_s"] == cat["time_s"] and run["frames_stored"] == 0
    assert 0 < run["memory_bytes"] < 30 * 64  # 30 entries of a few dozen bytes
    from infmllm_ros.bench.drive import synthetic_road

    s = RetrievalSession(load_model("smollm2-135m"), capacity=256, recent=64, policy="window")
    s.ingest_frame(synthetic_road(0), 0.0)  # a camera's first frame is its scene
    s.ingest_frame(chelsea(), 3.0)
    before = s.cache.length
    assert s.ask("Was there a cat? At what time?", max_new_tokens=8, keep_in_context=False).verdict == "seen"
    assert s.cache.length == before and [n.label for n in s.index] == ["", "domestic cat"]
