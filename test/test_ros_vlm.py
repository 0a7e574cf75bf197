"""The node with a Hugging Face VLM directory (tiny random Qwen2.5-VL and SmolVLM2 built here) over real
DDS on loopback: raw frames in, /ask answered, and a broken checkpoint stops it with the reason."""

import shutil

import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
import yaml
from sensor_msgs.msg import Image
from test_vlm_families import frame

from infmllm_ros.bench.random_models import build_random_checkpoint
from infmllm_ros.tools.processes import ros_env, run_tool, start_node, stop_node
from ros_graph import Graph, header

TOPIC = "/vlmtest/front/image_raw"


@pytest.mark.parametrize("shape,family", [("qwen2.5-vl-tiny", "qwen2_5_vl"), ("smolvlm2-tiny", "smolvlm")])
def test_node_runs_a_hugging_face_vlm_directory(tmp_path, shape, family):
    model = build_random_checkpoint(shape, tmp_path / "model")
    env = ros_env()
    proc, log = start_node(
        tmp_path,
        env,
        {
            "model": str(model),
            "camera_topics": [TOPIC],
            "camera_transports": ["raw"],
            "qos_reliability": "reliable",
            "qos_depth": 5,
            "cache.capacity": 640,
            "cache.recent": 64,
            "novelty_threshold": 0.0,
            "max_new_tokens": 8,
            "diagnostics_period_s": 0.5,
        },
    )
    graph = Graph(env, {"camera": (Image, TOPIC)})
    try:
        for sec in (1, 2, 3):
            rgb = frame(sec)
            msg = Image(
                header=header(1_700_000_000 + sec),
                height=rgb.shape[0],
                width=rgb.shape[1],
                encoding="rgb8",
                step=rgb.shape[1] * 3,
                data=rgb.tobytes(),
            )
            assert graph.publish_and_wait(graph.camera, msg) == "ingested"
        out = run_tool("infmllm-ask", ["What did you see?", "--timeout", "120"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "3 frames in context" in out.stdout
        status = graph.latest_status()
        assert status["frames_ingested"] == "3" and status["frames_stored"] == "3"
        assert f"({family} family)" in log.read_text()
    finally:
        graph.close()
        assert stop_node(proc) == 0


def test_node_refuses_a_checkpoint_without_its_tokenizer(tmp_path):
    model = build_random_checkpoint("smolvlm2-tiny", tmp_path / "smol")
    (model / "tokenizer.json").unlink()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"model": str(model)}}}))
    out = run_tool("infmllm-node", ["--ros-args", "--params-file", params], ros_env(), timeout_s=120)
    assert out.returncode == 2
    assert f"no tokenizer.json in {model}" in out.stdout + out.stderr
    shutil.rmtree(model)
