"""Memory that survives a restart, over real DDS on loopback: a node with ``memory_file`` sees a
cat, is stopped with SIGTERM (saving), and a new node on the same file answers about the cat as
the first one did; ``~/save_memory``, ``~/load_memory`` and ``~/reset_memory``; a file cut
short is refused at start and the node runs with empty memory, saying so."""
import signal

import cv2
import numpy as np
import pytest

import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
from sensor_msgs.msg import CompressedImage
from std_srvs.srv import Trigger

from infmllm_interfaces.srv import MemoryFile
from ros_graph import camera_graph, header

from infmllm_ros.tools.ask import call_ask
from infmllm_ros.tools.processes import start_node, stop_node

TOPIC = "/memtest/front/image_raw/compressed"
T0 = 1_700_000_000
QUESTION = "Was there a cat? At what time?"


def jpeg(rgb, sec):
    return CompressedImage(header=header(sec), format="jpeg",
                           data=cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


def node(tmp, env, memory_file):
    return start_node(tmp, env, {"camera_topics": [TOPIC], "qos_reliability": "reliable", "qos_depth": 5,
                                 "cache.capacity": 512, "cache.recent": 128, "max_new_tokens": 16,
                                 "memory_file": str(memory_file), "diagnostics_period_s": 0.5})


@pytest.fixture(scope="module")
def graph():
    with camera_graph(CompressedImage, TOPIC) as pair:
        yield pair


def test_a_restarted_node_remembers_what_the_first_one_saw(graph, tmp_path):
    from skimage.data import chelsea

    env, g = graph
    memory = tmp_path / "memory.safetensors"
    (tmp_path / "a").mkdir()
    proc, log = node(tmp_path / "a", env, memory)
    try:
        for i, rgb in enumerate([np.full((120, 160, 3), 60, np.uint8), chelsea(), np.full((120, 160, 3), 70, np.uint8)]):
            assert g.publish_and_wait(g.camera, jpeg(rgb, T0 + 10 * i)) == "ingested"
        before = call_ask(g.node, "/ask", QUESTION, 16)
        assert before.success and before.sighting_stamps[0].sec == T0 + 10
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "saved" in log.read_text() and memory.is_file()

    (tmp_path / "b").mkdir()
    proc, log = node(tmp_path / "b", env, memory)
    try:
        assert "loaded" in log.read_text()
        after = call_ask(g.node, "/ask", QUESTION, 16)
        assert after.success and after.answer == before.answer and after.evidence == before.evidence
        assert [(t.sec, t.nanosec) for t in after.sighting_stamps] == [(t.sec, t.nanosec) for t in before.sighting_stamps]
        assert after.frames_in_context == before.frames_in_context
        # The stream goes on after the restart: order and stamps continue from the file.
        assert g.publish_and_wait(g.camera, jpeg(np.full((120, 160, 3), 80, np.uint8), T0 + 30)) == "ingested"
        assert g.publish_and_wait(g.camera, jpeg(np.full((120, 160, 3), 90, np.uint8), T0 + 29)) == "late"

        saved = g.call(MemoryFile, "/infmllm/save_memory", MemoryFile.Request(path=str(tmp_path / "copy.safetensors")))
        assert saved.success and "saved" in saved.message
        reset = g.call(Trigger, "/infmllm/reset_memory", Trigger.Request())
        assert reset.success
        gone = call_ask(g.node, "/ask", QUESTION, 16)
        assert not gone.success and "no camera frame has been ingested yet" in gone.message
        back = g.call(MemoryFile, "/infmllm/load_memory", MemoryFile.Request(path=str(tmp_path / "copy.safetensors")))
        assert back.success, back.message
        again = call_ask(g.node, "/ask", QUESTION, 16)
        assert again.sighting_stamps[0].sec == T0 + 10 and again.seen
        bad = g.call(MemoryFile, "/infmllm/load_memory", MemoryFile.Request(path=str(tmp_path / "none")))
        assert not bad.success and "no memory file" in bad.message
    finally:
        assert stop_node(proc) == 0


def test_a_memory_file_cut_short_is_refused_and_the_node_starts_empty(graph, tmp_path):
    env, g = graph
    memory = tmp_path / "memory.safetensors"
    memory.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"infmllm\"")
    proc, log = node(tmp_path, env, memory)
    try:
        text = log.read_text()
        assert "memory file refused" in text and "cut short" in text and "starting with empty memory" in text
        assert g.publish_and_wait(g.camera, jpeg(np.full((120, 160, 3), 60, np.uint8), T0)) == "ingested"
    finally:
        assert stop_node(proc) == 0
