"""Where: every stored frame keeps the robot's pose nearest its stamp, answers say where, the
pose survives eviction and a restart, and bad poses are refused.

Pure Python (no ROS graph): the pose matcher, the worker's pose path, the session, the answer
template and the memory file. The node's pose subscription is tested over DDS in
``test/test_ros_memory.py``.
"""

import math

import numpy as np
import pytest

from infmllm_ros.bench.drive import synthetic_road
from infmllm_ros.runtime.pose import Pose, PoseMatcher
from infmllm_ros.runtime.session import StreamSession

MAP = "map"


def pose(x, y=0.0):
    return Pose(x, y, frame_id=MAP)


@pytest.mark.parametrize(
    "fields,said",
    [
        ((math.nan, 0.0), "NaN or infinite"),
        ((0.0, math.inf), "NaN or infinite"),
        ((2e6, 0.0), "beyond"),
        ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0), "not a unit quaternion"),
        ((0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), "unit"),
    ],
)
def test_a_broken_pose_is_refused_with_the_reason(fields, said):
    with pytest.raises(ValueError, match=said):
        Pose(*fields)


def test_a_frame_takes_the_nearest_pose_within_the_tolerance_whichever_comes_first():
    m = PoseMatcher(tolerance_s=0.1)
    for t in (0.0, 0.05, 0.1):
        assert m.add_pose(t, pose(t * 10)) == []
    assert m.add_frame(7, 0.06) == pose(0.5)  # nearest of the poses held
    assert m.add_frame(8, 0.14) == pose(1.0)  # still waiting: a nearer pose may come
    assert m.add_pose(0.15, pose(1.5)) == [(8, pose(1.5))]  # it came (a bag interleaves topics)
    assert m.add_frame(9, 5.0) is None  # no pose near yet
    assert m.add_pose(4.95, pose(49.5)) == [(9, pose(49.5))]  # its pose, from before the frame, arrives after it
    assert m.add_pose(5.2, pose(52)) == []  # 0.2 s away: not this frame's
    assert m.pending == 0  # poses past 5.1 s have come (a topic's poses arrive in order): nothing nearer can
    assert m.add_frame(10, 9.0) is None and m.add_pose(9.5, pose(95)) == [] and m.pending == 0  # none near: no position


def test_poses_at_200_hz_for_ten_minutes_keep_the_matcher_bounded():
    m = PoseMatcher(tolerance_s=0.1)
    for i in range(200 * 600):
        t = i / 200
        m.add_pose(t, pose(t))
        if i % 200 == 0:
            m.add_frame(i // 200, t + 0.003)
    assert len(m) <= 200 * m.horizon_s + 1 and m.pending <= 1


@pytest.fixture(scope="module")
def located(embedded):
    """A session whose frames have poses: road frames along x, the cat at (30, -4)."""
    from skimage.data import chelsea, coffee

    s = StreamSession(
        embedded,
        capacity=512,
        recent=128,
        max_chunk=64,
        track_positions=True,
        near_radius_m=5.0,
        familiar_interval_s=0.0,
    )
    s.ingest_frame(synthetic_road(0), 0.0, pose=pose(0.0))
    s.ingest_frame(chelsea(), 12.0, pose=Pose(30.0, -4.0, frame_id=MAP))
    s.ingest_frame(synthetic_road(13), 13.0)  # its pose comes later
    s.ingest_frame(coffee(), 20.0)  # and this one never has one
    assert s.set_frame_pose(2, pose(32.0, -4.0)) and not s.set_frame_pose(99, pose(1.0))
    return s


def test_where_did_you_see_it_says_where_and_when(located):
    a = located.ask("Where did you see a cat?", max_new_tokens=12, keep_in_context=False)
    assert a.seen and a.sightings[0].pose == Pose(30.0, -4.0, frame_id=MAP)
    assert a.evidence == "Memory: I saw a domestic cat at t=12 s, near (30.0, -4.0) in map."


def test_a_frame_without_a_pose_says_its_position_is_unknown(located):
    a = located.ask("Was there an espresso?", max_new_tokens=8, keep_in_context=False)
    assert a.seen and a.sightings[0].pose is None
    assert a.evidence == "Memory: I saw an espresso at t=20 s, position unknown."


def test_what_did_you_see_near_a_point_lists_the_frames_within_the_radius(located):
    a = located.ask("What did you see near (31, -3)?", max_new_tokens=8, keep_in_context=False)
    assert a.evidence.startswith("Memory: within 5 m of (31, -3) I saw a domestic cat at t=12 s, near (30.0, -4.0)")
    assert "t=0 s" not in a.evidence and a.verdict == "undecided"
    far = located.ask("What did you see near (500, 500)?", max_new_tokens=8, keep_in_context=False)
    assert far.evidence.startswith("Memory: I remember no frame within 5 m of (500, 500); the closest was")


def test_without_pose_tracking_answers_say_nothing_of_position(embedded):
    from skimage.data import chelsea

    s = StreamSession(embedded, capacity=512, recent=128, max_chunk=64)
    s.ingest_frame(synthetic_road(0), 0.0)
    s.ingest_frame(chelsea(), 12.0)
    assert s.ask("Where did you see a cat?", max_new_tokens=4).evidence == "Memory: I saw a domestic cat at t=12 s."


def test_poses_come_back_after_a_restart_and_a_file_without_poses_still_loads(located, embedded, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "memory.safetensors"
    located.save_memory(path)
    again = StreamSession(embedded, capacity=512, recent=128, max_chunk=64, track_positions=True)
    again.load_memory(path)
    assert {f.frame_id: f.pose for f in again.memory_frames()} == {f.frame_id: f.pose for f in located.memory_frames()}
    with safe_open(str(path), framework="pt") as f:  # as written before frames had poses
        meta = json.loads(f.metadata()["infmllm"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta["state"]["frame_info"] = {k: v[:2] for k, v in meta["state"]["frame_info"].items()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"infmllm": json.dumps(meta)})
    again.load_memory(old)
    assert all(f.pose is None for f in again.memory_frames()) and len(again.memory_frames()) == 4


def test_the_worker_gives_each_stored_frame_its_pose_and_counts_refusals(embedded):
    from infmllm_ros.ros.worker import IngestWorker

    s = StreamSession(embedded, capacity=512, recent=128, max_chunk=64, track_positions=True, familiar_interval_s=0.0)
    w = IngestWorker(s, 0.0, 0.0, log=lambda m: None, poses=PoseMatcher(0.1))
    w.add_pose(100.0, pose(1.0))
    w.add_pose(math.nan, None, "pose has a NaN or infinite field")
    rgb = np.asarray(synthetic_road(0))
    s.ingest_frame(rgb, 0.0)
    w.poses.add_frame(0, 100.02)  # what the worker's thread does after a stored frame
    w.add_pose(100.01, pose(2.0))  # nearer, and late
    assert s.memory_frames()[0].pose == pose(2.0)
    st = w.stats()
    assert (st.poses_received, st.poses_refused, st.frames_with_pose) == (3, 1, 1)
    assert "pose refused" in st.last_error


def test_a_seen_answer_must_state_the_position_its_evidence_states():
    from infmllm_ros.runtime.answer import AnswerTemplate, Verdict

    t = AnswerTemplate()
    ev = t._stated(Verdict.SEEN, "I saw a cat at t=12 s, near (30.0, -4.0) in map.", ("cat",), (12.0,), True)
    assert ev.places == ((30.0, -4.0),)
    assert t.check("I saw a cat at t=12 s.", ev, {"cat"}) == ["states no position, where the evidence does"]
    assert t.check("A cat, at t=12 s near (30.0, -4.0).", ev, {"cat"}) == []
    assert t.check("A cat at t=12 s near (1, 2).", ev, {"cat"})[0].startswith("states a position (1, 2)")
    assert t.settle("I saw a cat at t=12 s.", ev, {"cat"})[:2] == (ev.sentence, "evidence")
