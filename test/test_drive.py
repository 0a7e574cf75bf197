"""Bag-free drive generator: events at known times, looping video, manifest, answer scoring."""

import cv2
import numpy as np
import pytest

from infmllm_ros.bench.drive import Drive, Event, bundled_events, events_from_dir, score_answer, video_frames


def background(t):
    return np.full((48, 64, 3), int(t) % 256, np.uint8)


def test_events_appear_exactly_at_their_times():
    events = bundled_events()
    drive = Drive(background, minutes=5, fps=1, events=events, seed=3)
    shown = {label: t for t, _, label in drive.frames() if label}
    assert shown == {e.label: e.time_s for e in drive.schedule}
    assert set(shown) == set(events) and len(list(drive.frames())) == 300
    times = sorted(shown.values())
    assert all(b - a >= 20 for a, b in zip(times, times[1:])) and 20 <= times[0] and times[-1] < 270
    frame_at = {t: img for t, img, label in drive.frames() if label == "cat"}
    assert next(iter(frame_at.values())) is events["cat"][0]


def test_seed_changes_schedule_and_manifest_has_questions():
    a = Drive(background, 5, 1, bundled_events(), seed=1).manifest()
    b = Drive(background, 5, 1, bundled_events(), seed=2).manifest()
    assert a["events"] != b["events"]
    assert {e["question"] for e in a["events"]} >= {"Was there a cat? At what time?"}


def test_too_many_events_and_bad_rates():
    with pytest.raises(ValueError, match="do not fit"):
        Drive(background, 1, 1, bundled_events())
    with pytest.raises(ValueError, match="must be > 0"):
        Drive(background, 0, 1, {})


def test_video_is_sampled_by_time_and_looped(tmp_path):
    path = tmp_path / "clip.avi"
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):  # 3 s at 10 fps, brightness = frame index * 8
        out.write(np.full((48, 64, 3), i * 8, np.uint8))
    out.release()
    frame = video_frames(path, fps=1)
    levels = [int(frame(t).mean()) for t in (0, 1, 2, 3)]
    assert abs(levels[0] - 0) < 6 and abs(levels[1] - 80) < 6 and abs(levels[2] - 160) < 6
    assert levels[3] == levels[0]  # looped
    with pytest.raises(FileNotFoundError, match="video not found"):
        video_frames(tmp_path / "none.mp4", 1)


def test_events_from_dir(tmp_path):
    cv2.imwrite(str(tmp_path / "fire_truck.png"), np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    ev = events_from_dir(tmp_path)
    assert list(ev) == ["fire truck"] and ev["fire truck"][1] == ("truck",)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no readable images"):
        events_from_dir(empty)
    with pytest.raises(FileNotFoundError, match="events folder not found"):
        events_from_dir(tmp_path / "missing")


def test_score_answer_needs_the_name_and_a_stated_time():
    e = Event("cat", 312.0, ("cat", "tabby"))
    assert score_answer("I saw a tabby cat at <frame t=305.0s cam=front>.", e)["correct"]
    assert not score_answer("I saw a tabby cat at <frame t=300.0s cam=front>.", e)["correct"]  # 12 s off
    assert score_answer("I saw a tabby cat at t=300 s.", e, tolerance_s=60.0)["correct"]  # long drives: the minute
    assert score_answer("Yes, a cat.", e) == {
        "named": True,
        "timed": False,
        "time_error_s": None,
        "recalled": False,
        "correct": False,
        "degenerate": False,
    }
    # The cache's sighting is scored apart: it cannot make an answer that states no time correct.
    echo = score_answer("Yes, a cat.", e, seen_at_s=310.0)
    assert echo["recalled"] and not echo["correct"]
    assert not score_answer("Yes, a cat.", e, seen_at_s=250.0)["recalled"]  # sighting too far off
    assert not score_answer("A truck at t=312.0s", e)["named"]
    assert score_answer("A cat at t=400s", e)["time_error_s"] == 88.0
    assert score_answer("A cat at 5:12.", e)["timed"] and score_answer("a cat, 310 seconds in", e)["timed"]
    assert score_answer("A cat after 5 minutes", e, tolerance_s=60.0)["timed"]
    assert score_answer("I'm sorry. I'm sorry for any confusion. I'm sorry for any confusion.", e)["degenerate"]
    # Numbers that are not times: a clock far off, a bare number, a year.
    assert not score_answer("The cat was at 1:22:32.1111", Event("cat", 40.0, ("cat",)))["timed"]
    assert not score_answer("A cat, 312 of them, in 2022", e)["timed"]


def test_clear_no_and_hallucinated_class():
    from infmllm_ros.bench.drive import names_unshown
    from infmllm_ros.runtime.answer import is_clear_no

    for text in (
        "No, no stored camera frame matches this question.",
        "No.",
        "I did not see a horse.",
        "Nothing like that.",
        'The answer to this question is: "No, there was no horse."',
    ):
        assert is_clear_no(text), text
    for text in ("The horse was at t=30 s.", "I see a horse. No more.", "A horse at t=12 s. Nothing else."):
        assert not is_clear_no(text), text
    vocab = {"cat": ("cat", "tabby"), "horse": ("horse",), "pizza": ("pizza",)}
    assert names_unshown("I saw a horse at t=30 s.", vocab, shown={"cat"})
    assert not names_unshown("No, I saw no horse.", vocab, shown={"cat"})
    assert not names_unshown("A tabby cat at t=30 s.", vocab, shown={"cat"})
    assert not names_unshown("It was a horseshoe crab? No idea", {"crab": ("crab",)}, shown={"crab"})


def test_a_repeated_event_is_shown_twice_and_asked_about_once_with_both_times():
    from infmllm_ros.tools.bag import questions_for

    plain = Drive(background, 5, 1, bundled_events(), seed=0)
    drive = Drive(background, 5, 1, bundled_events(), seed=0, again=("cat",))
    assert [e for e in drive.schedule if e in plain.schedule] == plain.schedule  # drives without repeats unchanged
    (again,) = [e for e in drive.schedule if e not in plain.schedule]
    assert again.label == "cat"
    shown = [(t, label) for t, _, label in drive.frames() if label == again.label]
    assert len(shown) == 2 and again.time_s in [t for t, _ in shown]
    questions = questions_for(drive)
    (twice,) = [q for q in questions if q.get("expect_times_s")]
    assert twice["label"] == again.label and twice["expect_times_s"] == sorted(t for t, _ in shown)
    assert sum(q.get("label") == again.label for q in questions) == 1
    (window,) = [q for q in questions if "window_s" in q]
    assert window["question"] == "What did you see between minute 2 and minute 3?" and window["window_s"] == [120, 180]
    assert set(window["expect_words_by_label"]) == {e.label for e in drive.schedule if 120 <= e.time_s <= 180}
    with pytest.raises(ValueError, match="must be distinct events"):
        Drive(background, 5, 1, bundled_events(), again=("giraffe",))


def test_repeated_and_window_answers_are_scored_by_every_time_and_every_event():
    from infmllm_ros.bench.drive import score_times, score_window

    assert score_times("I saw a cat at t=60 s and again at t=2460 s.", [60, 2460]) == {"timed": 2, "all_timed": True}
    assert score_times("I saw a cat at t=60 s.", [60, 2460]) == {"timed": 1, "all_timed": False}
    assert score_times("I saw a cat at t=300 s.", [280, 320], 60.0) == {"timed": 1, "all_timed": False}
    cats = {"cat": ["cat"], "coffee": ["coffee", "espresso"]}
    assert score_window("Between t=120 s and t=180 s I saw a domestic cat at t=140 s, an espresso at t=160 s.", cats)[
        "correct"
    ]
    assert not score_window("I saw a domestic cat at t=140 s.", cats)["correct"]
    assert score_window("Between t=120 s and t=180 s I saw nothing new (60 frames of the usual scene).", {})["correct"]
    assert not score_window("I saw a rocket.", {})["correct"]
