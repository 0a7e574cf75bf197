"""Memory that survives a restart, over real DDS on loopback: a node with ``memory_file`` sees a
cat, is stopped with SIGTERM (saving), and a new node on the same file answers about the cat as
the first one did; ``~/save_memory``, ``~/load_memory`` and ``~/reset_memory``; a file cut
short is refused at start and the node runs with empty memory, saying so."""

import signal
import time

import numpy as np
import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
from sensor_msgs.msg import CompressedImage
from std_srvs.srv import Trigger

from infmllm_interfaces.srv import MemoryFile
from infmllm_ros.tools.ask import call_ask
from infmllm_ros.tools.processes import start_node, stop_node
from ros_graph import camera_graph, jpeg, one_camera

TOPIC = "/memtest/front/image_raw/compressed"
T0 = 1_700_000_000
QUESTION = "Was there a cat? At what time?"


def node(tmp, env, memory_file, **params):
    return start_node(
        tmp,
        env,
        one_camera(
            TOPIC, {"max_new_tokens": 16, "memory_file": str(memory_file), "diagnostics_period_s": 0.5, **params}
        ),
    )


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
        for i, rgb in enumerate(
            [np.full((120, 160, 3), 60, np.uint8), chelsea(), np.full((120, 160, 3), 70, np.uint8)]
        ):
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
        assert [(t.sec, t.nanosec) for t in after.sighting_stamps] == [
            (t.sec, t.nanosec) for t in before.sighting_stamps
        ]
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


def save(g, path: str):
    return g.call(MemoryFile, "/infmllm/save_memory", MemoryFile.Request(path=path))


def test_refused_memory_files_are_kept_intact_and_saves_stay_inside_memory_dir(graph, tmp_path):
    env, g = graph
    folder = tmp_path / "memory"
    folder.mkdir()
    memory = folder / "memory.safetensors"
    cut = b'\x10\x00\x00\x00\x00\x00\x00\x00{"infmllm"'
    memory.write_bytes(cut)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = folder / "victim.txt"
    victim.write_text("not a memory")
    (folder / "link").symlink_to(outside)
    proc, log = node(tmp_path, env, "memory.safetensors", memory_dir=str(folder))
    try:
        text = log.read_text()
        assert "memory file refused" in text and "cut short" in text and "starting with empty memory" in text
        (aside,) = folder.glob("memory.safetensors.refused-unreadable-*")
        assert f"kept intact as {aside}" in text and aside.read_bytes() == cut
        assert g.publish_and_wait(g.camera, jpeg(np.full((120, 160, 3), 60, np.uint8), T0)) == "ingested"
        for path in ("../x.safetensors", str(outside / "x.safetensors"), "link/x.safetensors"):
            answer = save(g, path)
            assert not answer.success and "outside the memory folder" in answer.message, path
        answer = save(g, "victim.txt")
        assert not answer.success and "not overwritten" in answer.message
        answer = save(g, "new/x.safetensors")
        assert not answer.success and "does not exist" in answer.message
        assert list(outside.iterdir()) == [] and victim.read_text() == "not a memory"
        assert not (tmp_path / "x.safetensors").exists() and not (folder / "new").exists()
    finally:
        assert stop_node(proc) == 0
    assert "saved" in log.read_text() and memory.is_file() and aside.read_bytes() == cut

    # The same folder, a node of another capacity: the saved memory is refused and kept too, and a
    # temporary file of an interrupted save is removed at start.
    saved = memory.read_bytes()
    stale = folder / ".memory.safetensors.k9x2ab_q.tmp"
    stale.write_bytes(saved[:1000])
    (tmp_path / "b").mkdir()
    proc, log = node(tmp_path / "b", env, "memory.safetensors", memory_dir=str(folder), **{"cache.capacity": 640})
    try:
        assert not stale.exists() and f"removed {stale}" in log.read_text()
        (other,) = folder.glob("memory.safetensors.refused-other-stream-*")
        assert other.read_bytes() == saved and "capacity: 512 != 640" in log.read_text()
        assert not g.call(MemoryFile, "/infmllm/load_memory", MemoryFile.Request(path=other.name)).success
        assert other.read_bytes() == saved  # refused again, and not renamed twice
    finally:
        assert stop_node(proc) == 0
    assert memory.is_file() and aside.read_bytes() == cut and other.read_bytes() == saved


def test_a_kill_9_between_periodic_saves_restarts_on_the_last_good_memory(graph, tmp_path):
    env, g = graph
    memory = tmp_path / "memory.safetensors"
    (tmp_path / "a").mkdir()
    proc, log = node(tmp_path / "a", env, memory, memory_save_period_s=0.2)
    try:
        assert g.publish_and_wait(g.camera, jpeg(np.full((120, 160, 3), 60, np.uint8), T0)) == "ingested"
        saves, deadline = set(), time.monotonic() + 30
        while len(saves) < 4 and time.monotonic() < deadline:  # several periodic saves of the frame
            if memory.is_file():
                saves.add(memory.stat().st_mtime_ns)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (tmp_path / ".memory.safetensors.zz9_kill.tmp").write_bytes(b"the save the kill cut")
    (tmp_path / "b").mkdir()
    proc, log = node(tmp_path / "b", env, memory)
    try:
        assert "loaded" in log.read_text() and "1 frames" in log.read_text()
        assert not list(tmp_path.glob(".*.tmp"))
    finally:
        assert stop_node(proc) == 0
