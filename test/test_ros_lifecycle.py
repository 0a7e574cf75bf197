"""The node as a lifecycle node over real DDS on loopback: transitions in order and out of order,
a configure that fails with the reason while the process stays up, an inactive node that keeps
its memory and answers but does not ingest, cleanup that frees the model."""

import time

import cv2
import numpy as np
import pytest
import rclpy  # noqa: F401  (installed by make test: a broken ROS install fails the suite)
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from sensor_msgs.msg import CompressedImage

from infmllm_ros.tools.ask import call_ask
from infmllm_ros.tools.processes import start_node, stop_node
from ros_graph import camera_graph, header, one_camera

TOPIC = "/lifecycletest/front/image_raw/compressed"
WAITING = "waiting for a lifecycle manager"


def transition(graph, transition_id) -> bool:
    return graph.call(
        ChangeState, "/infmllm/change_state", ChangeState.Request(transition=Transition(id=transition_id))
    ).success


def state(graph) -> str:
    return graph.call(GetState, "/infmllm/get_state", GetState.Request()).current_state.label


@pytest.fixture(scope="module")
def graph():
    with camera_graph(CompressedImage, TOPIC) as pair:
        yield pair


def frame(sec, value=80):
    data = cv2.imencode(".jpg", np.full((120, 160, 3), value, np.uint8))[1].tobytes()
    return CompressedImage(header=header(sec), format="jpeg", data=data)


def test_a_bad_model_fails_configure_with_the_reason_and_the_process_stays_up(graph, tmp_path):
    env, g = graph
    proc, log = start_node(
        tmp_path,
        env,
        {"autostart": False, "model": str(tmp_path / "missing.gguf"), "camera_topics": [TOPIC]},
        ready=WAITING,
    )
    try:
        assert state(g) == "unconfigured"
        assert not transition(g, Transition.TRANSITION_ACTIVATE)  # activate before configure
        assert not transition(g, Transition.TRANSITION_CONFIGURE)
        assert state(g) == "unconfigured" and proc.poll() is None
        assert "configure failed" in log.read_text() and "missing.gguf" in log.read_text()
        refused = call_ask(g.node, "/ask", "What did you see?", 4)
        assert not refused.success and "not configured" in refused.message
    finally:
        assert stop_node(proc) == 0


def test_a_parameter_given_with_the_wrong_type_is_refused_by_name_and_the_process_stays_up(graph, tmp_path):
    env, g = graph
    given = {"sample_rate_hz": "fast", "cache.capacity": "big", "max_camera_rate_hz": 0}  # doubles, an int
    proc, log = start_node(tmp_path, env, {"autostart": False, "camera_topics": [TOPIC], **given}, ready=WAITING)
    try:
        assert not transition(g, Transition.TRANSITION_CONFIGURE)
        assert state(g) == "unconfigured" and proc.poll() is None
        assert "parameter sample_rate_hz='fast': must be a number (a double)" in log.read_text()
        (rate,) = g.call(
            GetParameters, "/infmllm/get_parameters", GetParameters.Request(names=["max_camera_rate_hz"])
        ).values
        assert (rate.type, rate.double_value) == (ParameterType.PARAMETER_DOUBLE, 0.0)  # an integer is that double
        fixed = Parameter(
            name="sample_rate_hz", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=2.0)
        )
        assert (
            g.call(SetParameters, "/infmllm/set_parameters", SetParameters.Request(parameters=[fixed]))
            .results[0]
            .successful
        )
        assert not transition(g, Transition.TRANSITION_CONFIGURE)  # the read-only one is still refused
        assert "configure failed: parameter cache.capacity='big': must be an integer" in log.read_text()
        assert state(g) == "unconfigured" and proc.poll() is None
    finally:
        assert stop_node(proc) == 0


def test_transitions_in_order_keep_memory_while_inactive_and_free_it_at_cleanup(graph, tmp_path):
    env, g = graph
    proc, log = start_node(
        tmp_path,
        env,
        one_camera(TOPIC, {"autostart": False, "max_new_tokens": 8, "diagnostics_period_s": 0.5}),
        ready=WAITING,
    )
    try:
        assert transition(g, Transition.TRANSITION_CONFIGURE) and state(g) == "inactive"
        assert transition(g, Transition.TRANSITION_ACTIVATE) and state(g) == "active"
        assert g.publish_and_wait(g.camera, frame(1_700_000_000)) == "ingested"
        assert transition(g, Transition.TRANSITION_DEACTIVATE) and state(g) == "inactive"
        received = int(g.latest_status()["frames_received"])
        for i in range(5):
            g.camera.publish(frame(1_700_000_001 + i, 90))
            time.sleep(0.2)
        assert int(g.latest_status()["frames_received"]) == received  # not subscribed
        answer = call_ask(g.node, "/ask", "What did you see?", 8)
        assert answer.success and answer.frames_in_context == 1  # memory kept, still answering
        assert transition(g, Transition.TRANSITION_ACTIVATE)
        assert g.publish_and_wait(g.camera, frame(1_700_000_010, 100)) == "ingested"
        assert transition(g, Transition.TRANSITION_DEACTIVATE) and transition(g, Transition.TRANSITION_CLEANUP)
        assert state(g) == "unconfigured" and "model and KV buffer freed" in log.read_text()
        assert not call_ask(g.node, "/ask", "What did you see?", 4).success
    finally:
        assert stop_node(proc) == 0
