"""Image decoding, parameter validation and the ingest worker, without a ROS graph."""

import re
import sys
import threading
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from infmllm_ros.ros.images import FrameError, compressed_to_rgb, raw_to_rgb
from infmllm_ros.ros.params import camera_name_from_topic, validate
from infmllm_ros.ros.worker import IngestWorker, PendingFrame


def rgb_image(h=6, w=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def raw(img, encoding, step_pad=0):
    h, w = img.shape[:2]
    rows = img.reshape(h, -1)
    rows = np.concatenate([rows, np.zeros((h, step_pad), np.uint8)], 1)
    return SimpleNamespace(
        encoding=encoding, height=h, width=w, step=rows.shape[1], is_bigendian=0, data=rows.tobytes()
    )


@pytest.mark.parametrize(
    "encoding,convert",
    [
        ("rgb8", lambda x: x),
        ("bgr8", lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2BGR)),
        ("rgba8", lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2RGBA)),
        ("bgra8", lambda x: cv2.cvtColor(x, cv2.COLOR_RGB2BGRA)),
    ],
)
def test_colour_encodings_round_trip(encoding, convert):
    img = rgb_image()
    assert np.array_equal(raw_to_rgb(raw(convert(img), encoding, step_pad=3)), img)


def test_mono_and_yuv422_decode_to_rgb():
    grey = rgb_image()[..., 0]
    out = raw_to_rgb(raw(grey[..., None], "mono8"))
    assert np.array_equal(out, np.repeat(grey[..., None], 3, 2))
    # A flat mid-grey frame in both 4:2:2 byte orders: Y=128, U=V=128 -> RGB ~ (128,128,128).
    for encoding in ("yuv422", "yuv422_yuy2", "yuyv", "uyvy"):
        flat = np.full((4, 8, 2), 128, np.uint8)
        assert np.abs(raw_to_rgb(raw(flat, encoding)).astype(int) - 128).max() <= 2
    # Bright Y with neutral chroma in UYVY order: luma bytes are the odd ones.
    uyvy = np.zeros((2, 4, 2), np.uint8)
    uyvy[..., 0], uyvy[..., 1] = 128, 200
    assert raw_to_rgb(raw(uyvy, "yuv422")).min() > 190


@pytest.mark.parametrize(
    "msg,needle",
    [
        (dict(encoding="16UC1"), "unknown image encoding"),
        (dict(height=0), "zero size"),
        (dict(step=5), "shorter than"),
        (dict(data=b"\0" * 10), "needs"),
    ],
)
def test_bad_raw_images_are_named(msg, needle):
    good = vars(raw(rgb_image(), "rgb8"))
    with pytest.raises(FrameError, match=needle):
        raw_to_rgb(SimpleNamespace(**{**good, **msg}))


def test_odd_width_yuv_is_refused():
    with pytest.raises(FrameError, match="even width"):
        raw_to_rgb(SimpleNamespace(encoding="yuv422", height=2, width=3, step=6, is_bigendian=0, data=b"\0" * 12))


def test_jpeg_decodes_and_corrupt_jpeg_is_refused():
    img = np.full((16, 16, 3), (200, 30, 30), np.uint8)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out = compressed_to_rgb(SimpleNamespace(format="jpeg", data=jpeg.tobytes()))
    assert np.abs(out.astype(int) - img).max() < 12
    with pytest.raises(FrameError, match="cannot decode"):
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=jpeg.tobytes()[:20] + b"garbage" * 5))
    with pytest.raises(FrameError, match="empty"):
        compressed_to_rgb(SimpleNamespace(format="jpeg", data=b""))


def test_parameters_are_validated_with_the_name_in_the_message():
    cfg = validate({})
    assert cfg.cameras == [("camera/front/image_raw/compressed", "front", True)]
    assert cfg.session_kwargs()["sinks"] is None and cfg.session_kwargs()["novelty_threshold"] is None  # family's
    assert cfg.session_kwargs()["max_chunk"] is None and cfg.precision == "fp32"  # 0: the model's largest frame
    assert validate({"novelty_threshold": 0.3, "cache.max_chunk": 96}).session_kwargs()["max_chunk"] == 96
    sampled = validate({"answer.temperature": 0.7, "answer.top_p": 0.9, "answer.seed": 3}).sampling
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 3)
    assert cfg.sampling.no_repeat_ngram_size == 4 and cfg.sampling.seed is None  # loops end by default
    assert cfg.session_kwargs()["vision_budget"] is None  # -1: the session's default for the policy
    assert validate({"cache.vision_budget": 0}).session_kwargs()["vision_budget"] == 0
    assert validate({"cache.decay": 1.0}).session_kwargs()["decay"] == 1.0  # the policy's range: [0, 1]
    assert validate({"precision": "int8", "backend": "compiled"}).precision == "int8"  # the fast CPU answer path
    for bad, name in [
        ({"cache.policy": "lru"}, "cache.policy"),
        ({"camera_topics": []}, "camera_topics"),
        ({"cache.recent": 5000}, "cache.recent"),
        ({"backend": "openvino"}, "backend"),
        ({"backend": "tensorrt"}, "device"),
        ({"backend": "onnxruntime", "device": "cuda"}, "device"),
        ({"device": "gpu"}, "device"),
        ({"novelty_threshold": 1.5}, "novelty_threshold"),
        ({"novelty_threshold": -0.5}, "novelty_threshold"),
        ({"precision": "int4"}, "precision"),
        ({"precision": "int8", "device": "cuda"}, "device"),
        ({"cache.max_chunk": 4}, "cache.max_chunk"),
        ({"sample_rate_hz": float("nan")}, "sample_rate_hz"),
        ({"sample_rate_hz": float("inf")}, "sample_rate_hz"),
        ({"answer.repetition_penalty": 0.0}, "answer.repetition_penalty"),
        ({"answer.repetition_penalty": float("nan")}, "answer.repetition_penalty"),
        ({"answer.no_repeat_ngram_size": -1}, "answer.no_repeat_ngram_size"),
        ({"answer.sentence_stop_words": -2}, "answer.sentence_stop_words"),
        ({"answer.temperature": -1.0}, "answer.temperature"),
        ({"answer.top_p": 0.0}, "answer.top_p"),
        ({"answer.seed": -5}, "answer.seed"),
        ({"answer.evidence_sightings": 11}, "answer.evidence_sightings"),
        ({"answer.seen_threshold": float("inf")}, "answer.seen_threshold"),
        ({"familiar_interval_s": -1.0}, "familiar_interval_s"),
        ({"cache.policy": "streaming_llm", "cache.vision_budget": 64}, "does not score slots"),
        ({"cache.vision_budget": 900}, "cache.vision_budget"),
        ({"cache.vision_budget": -2}, "cache.vision_budget"),
        ({"cache.decay": 1.5}, "cache.decay"),
        ({"cache.beta": float("nan")}, "cache.beta"),
        ({"cache.beta": -0.1, "cache.policy": "h2o"}, "cache.beta"),
        ({"camera_transports": ["raw", "jpeg"], "camera_topics": ["a", "b"]}, "camera_transports"),
        ({"cache.capacity": "big"}, "cache.capacity='big': must be an integer"),
        ({"cache.capacity": 1024.0}, "cache.capacity=1024.0: must be an integer"),
        ({"qos_depth": True}, "qos_depth=True: must be an integer"),
        ({"sample_rate_hz": "2"}, "sample_rate_hz='2': must be a number"),
        ({"autostart": 1}, "autostart=1: must be true or false"),
        ({"model": 3}, "model=3: must be a string"),
        ({"camera_topics": "/front/image_raw"}, "camera_topics='/front/image_raw': must be a list of strings"),
    ]:
        with pytest.raises(ValueError, match=re.escape(name)):
            validate(bad)
    rate = validate({"max_camera_rate_hz": 5}).max_camera_rate_hz  # YAML's 5 for 5.0
    assert type(rate) is float and rate == 5.0
    two = validate(
        {
            "camera_topics": ["/a/image_raw", "/rear/image_raw/compressed"],
            "camera_transports": ["raw", "compressed"],
            "camera_names": ["left"],
        }
    )
    assert two.cameras == [("/a/image_raw", "left", False), ("/rear/image_raw/compressed", "rear", True)]
    assert camera_name_from_topic("/robot/camera/image_raw") == "robot"


class FakeSession:
    """Records ingests and keeps each camera's newest stamp as StreamSession does;
    ``block`` holds the worker inside ingest_frame."""

    def __init__(self):
        self.ingested, self.restarted, self.block = [], [], threading.Event()
        self.camera_stamps = {}
        self.block.set()

    def restart_camera(self, camera):
        self.restarted.append(camera)
        self.camera_stamps.pop(camera, None)

    def ingest_frame(self, rgb, stamp_s, camera):
        self.block.wait(10)
        self.ingested.append((stamp_s, camera, rgb.shape))
        self.camera_stamps[camera] = stamp_s
        return SimpleNamespace(vision_ms=1.0, prefill_ms=2.0, evicted_tokens=3, stored=True)


def frame(camera, stamp, value=0, encoding="rgb8"):
    img = np.full((8, 8, 3), value, np.uint8)
    return PendingFrame(camera, stamp, raw(img, encoding), compressed=False)


def run_worker(session, frames, rate=0.0, dup=0.0):
    done = []
    w = IngestWorker(
        session, rate, dup, on_done=lambda f, o, d: done.append((f.camera, f.stamp_s, o)), log=lambda m: None
    )
    w.start()
    for f in frames:
        w.offer(f)
        deadline = time.monotonic() + 5
        while not w.idle() and time.monotonic() < deadline:
            time.sleep(0.005)
    assert w.stop(5)
    return w, done


def test_worker_samples_by_stamp_and_uses_stream_time():
    s = FakeSession()
    w, done = run_worker(s, [frame("front", 100.0 + 0.25 * i, i) for i in range(9)], rate=1.0)
    assert [x[0] for x in s.ingested] == [0.0, 1.0, 2.0]  # seconds since the first ingested frame
    assert [o for *_, o in done].count("sampled_out") == 6
    st = w.stats()
    assert st.origin_s == 100.0 and st.outcomes["ingested"] == 3 and st.evicted_tokens == 9 and st.stored == 3


def test_worker_rejects_bad_late_and_duplicate_frames_without_touching_the_stream():
    s = FakeSession()
    frames = [
        frame("front", 10.0, 10),
        frame("front", 11.0, 10),  # same picture: duplicate
        frame("front", 12.0, 0, encoding="32FC1"),
        frame("front", 13.0, 90),
        frame("front", 12.5, 50),
    ]  # half a second older than its camera's newest: reordered
    w, done = run_worker(s, frames, dup=0.01)
    assert [o for *_, o in done] == ["ingested", "duplicate", "rejected", "ingested", "late"]
    assert [x[0] for x in s.ingested] == [0.0, 3.0]
    assert "older than camera 'front'" in w.stats().last_error


def test_each_camera_is_ordered_on_its_own_clock_and_a_clock_that_jumps_back_restarts_it():
    s = FakeSession()
    frames = [
        frame("front", 100.0, 10),
        frame("front", 110.0, 20),
        frame("rear", 105.0, 30),  # behind front's clock, first of its own: taken
        frame("front", 101.0, 40),  # 9 s back (> clock_reset_s): a bag loop, not a late frame
        frame("front", 102.0, 50),
    ]
    w, done = run_worker(s, frames)
    assert [o for *_, o in done] == ["ingested"] * 5
    assert [(t, c) for t, c, _ in s.ingested] == [
        (0.0, "front"),
        (10.0, "front"),
        (5.0, "rear"),
        (1.0, "front"),
        (2.0, "front"),
    ]
    assert s.restarted == ["front"] and w.stats().clock_resets == 1


def test_frames_over_the_pixel_limit_are_refused_from_the_header_before_decoding():
    """A 16000 x 16000 PNG (a ~1 MiB decompression bomb) and an 8K raw header with no pixels:
    both refused as too_large in well under a second, with no decoded pixels allocated."""
    import resource

    import cv2

    bomb = cv2.imencode(".png", np.zeros((16000, 16000), np.uint8))[1].tobytes()
    assert len(bomb) < 2**20
    s = FakeSession()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    w, done = run_worker(
        s,
        [
            PendingFrame("front", 1.0, SimpleNamespace(format="png", data=bomb), True),
            PendingFrame(
                "front",
                2.0,
                SimpleNamespace(encoding="rgb8", width=7680, height=4320, step=3 * 7680, is_bigendian=0, data=b""),
                False,
            ),
        ],
    )
    assert time.perf_counter() - t0 < 1.0
    assert [o for *_, o in done] == ["too_large", "too_large"] and not s.ingested
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 100 * 2**20
    assert "max_frame_pixels" in w.stats().last_error


def test_worker_keeps_the_newest_frame_and_counts_drops():
    s = FakeSession()
    s.block.clear()  # the model is busy with the first frame
    done = []
    w = IngestWorker(s, 0.0, 0.0, on_done=lambda f, o, d: done.append((f.stamp_s, o)), log=lambda m: None)
    w.start()
    w.offer(frame("front", 1.0))
    time.sleep(0.2)
    for t in (2.0, 3.0, 4.0):
        w.offer(frame("front", t))
    s.block.set()
    deadline = time.monotonic() + 5
    while not w.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.stop(5)
    assert sorted(done) == [(1.0, "ingested"), (2.0, "dropped"), (3.0, "dropped"), (4.0, "ingested")]
    assert w.stats().outcomes["dropped"] == 2


def test_questions_run_on_the_worker_thread_before_pending_frames():
    s = FakeSession()
    s.block.clear()
    order = []
    w = IngestWorker(s, 0.0, 0.0, on_done=lambda f, o, d: order.append(("frame", f.stamp_s)), log=lambda m: None)
    w.start()
    w.offer(frame("front", 1.0))
    time.sleep(0.2)  # the worker is inside ingest of frame 1.0
    w.offer(frame("front", 2.0))
    asked = w.call(lambda: (order.append(("ask", threading.current_thread().name)), 42)[1])
    failed = w.call(lambda: 1 / 0)
    s.block.set()
    assert asked.result(5) == 42
    with pytest.raises(ZeroDivisionError):
        failed.result(5)
    while not w.idle():
        time.sleep(0.01)
    assert w.stop(5)
    assert order == [("frame", 1.0), ("ask", "infmllm-ingest"), ("frame", 2.0)]
    with pytest.raises(RuntimeError, match="stopped"):
        w.call(lambda: None)


def test_a_new_parameter_is_one_table_row_with_its_field_rule_and_session_setting(monkeypatch):
    """The parameter module with one row added (as a developer would) gives the row a config
    field, its default, its rule and its session keyword, with no other edit."""
    import types
    from dataclasses import fields
    from pathlib import Path

    import infmllm_ros.ros.params as params

    row = 'Param("example_budget", 3, "an example", check=Range(1, 5), session="example_budget", none_when=1),\n'
    source = Path(params.__file__).read_text().replace("PARAMETERS = (\n", "PARAMETERS = (\n    " + row, 1)
    grown = types.ModuleType("infmllm_ros.ros.params_grown")
    grown.__package__ = "infmllm_ros.ros"
    monkeypatch.setitem(sys.modules, grown.__name__, grown)  # dataclasses look their module up
    exec(compile(source, "params_grown.py", "exec"), grown.__dict__)
    assert {f.name for f in fields(grown.NodeConfig)} == {f.name for f in fields(params.NodeConfig)} | {
        "example_budget"
    }
    assert grown.validate({}).example_budget == 3
    assert grown.validate({"example_budget": 4}).session_kwargs()["example_budget"] == 4
    assert grown.validate({"example_budget": 1}).session_kwargs()["example_budget"] is None  # the session's own
    with pytest.raises(ValueError, match=r"parameter example_budget=9: must be in \[1, 5\]"):
        grown.validate({"example_budget": 9})


def test_every_parameter_row_reaches_the_config_and_each_session_row_the_session():
    from dataclasses import fields

    from infmllm_ros.ros.params import PARAMETERS, NodeConfig
    from infmllm_ros.runtime.session import AnswerSettings

    assert [f.name for f in fields(NodeConfig)] == [p.attr for p in PARAMETERS]
    cfg = validate({"answer.seen_threshold": 0.42, "max_question_tokens": 77, "answer.top_p": 0.5})
    kwargs = cfg.session_kwargs()
    for p in PARAMETERS:
        if p.session and "." not in p.session:
            assert p.session in kwargs, p.name
    assert cfg.answer_settings == AnswerSettings(
        sampling=cfg.sampling,
        sentence_stop_words=16,
        evidence_sightings=1,
        seen_threshold=0.42,
        max_question_tokens=77,
        near_radius_m=5.0,
    )
    assert cfg.sampling.top_p == 0.5 and kwargs["seen_threshold"] == 0.42
