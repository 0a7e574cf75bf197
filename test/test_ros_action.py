"""The ``ask`` action over real DDS on loopback: the answer streams as feedback before the
result, a cancel mid-answer leaves the stream as it was, and ``infmllm-ask --stream`` prints it."""

import threading
import time

import cv2
import numpy as np
import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
from sensor_msgs.msg import CompressedImage

from infmllm_ros.tools.ask import stream_ask
from infmllm_ros.tools.processes import ros_env, run_tool, start_node, stop_node
from ros_graph import Graph, header, one_camera

TOPIC = "/actiontest/front/image_raw/compressed"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("action")
    env = ros_env()
    # Plain greedy without a sentence stop: answers run to their token budget.
    proc, log = start_node(
        tmp,
        env,
        one_camera(
            TOPIC,
            {
                "answer.repetition_penalty": 1.0,
                "answer.no_repeat_ngram_size": 0,
                "answer.sentence_stop_words": 0,
                "diagnostics_period_s": 0.5,
                "memory_image_period_s": 0.5,
            },
        ),
    )
    graph = Graph(env, {"camera": (CompressedImage, TOPIC)})
    frame = cv2.imencode(".jpg", np.full((120, 160, 3), 80, np.uint8))[1].tobytes()
    assert (
        graph.publish_and_wait(graph.camera, CompressedImage(header=header(1_700_000_000), format="jpeg", data=frame))
        == "ingested"
    )
    yield {"env": env, "graph": graph, "log": log}
    graph.close()
    assert stop_node(proc) == 0


def test_the_answer_streams_as_feedback_before_the_result(system):
    g = system["graph"]
    feedback = []
    result = stream_ask(g.node, "/ask", "Describe the road.", 12, on_feedback=feedback.append)
    assert result.success and result.answer.answer
    assert len(feedback) >= 5 and [f.tokens for f in feedback][:5] == [1, 2, 3, 4, 5]
    assert feedback[-1].text == result.answer.answer and feedback[-1].tokens == 12


def test_a_cancel_mid_answer_leaves_the_stream_as_before(system):
    g = system["graph"]
    before = int(g.latest_status()["kv_tokens"])
    cancel, feedback = threading.Event(), []

    def on_feedback(f):
        feedback.append(f)
        if f.tokens >= 6:
            cancel.set()

    t0 = time.monotonic()
    result = stream_ask(
        g.node, "/ask", "Describe the road.", 1024, keep_in_context=True, on_feedback=on_feedback, cancel=cancel
    )
    assert time.monotonic() - t0 < 30  # 1024 tokens would take ~100 s here
    assert not result.success and result.answer.stopped == "cancelled" and "cancelled" in result.message
    assert result.answer.tokens_in_cache == before and int(g.latest_status()["kv_tokens"]) == before


def test_the_memory_image_shows_the_frames_in_context(system):
    from sensor_msgs.msg import Image

    from infmllm_ros.ros.memory_image import CAPTION_H
    from infmllm_ros.runtime.session import THUMBNAIL_SIZE

    g = system["graph"]
    images = []
    g.node.create_subscription(Image, "/infmllm/memory_image", images.append, 1)
    deadline = time.monotonic() + 10
    while not images and time.monotonic() < deadline:
        time.sleep(0.1)
    (image, *_) = images
    frames = stream_ask(g.node, "/ask", "Describe the road.", 1).answer.frames_in_context
    assert frames == 1 and (image.height, image.width) == (THUMBNAIL_SIZE[1] + CAPTION_H, 8 * THUMBNAIL_SIZE[0])
    rgb = np.frombuffer(bytes(image.data), np.uint8).reshape(image.height, image.width, 3)
    assert abs(int(rgb[10, 10].mean()) - 80) <= 3 and rgb[10, 200].max() == 0  # the grey frame, then empty tiles


def test_the_console_client_streams(system):
    out = run_tool("infmllm-ask", ["Describe the road.", "--stream", "--max-new-tokens", "8"], system["env"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "frames in context" in out.stdout
