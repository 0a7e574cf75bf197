"""Starting the node and the tools as separate processes, as on a robot: loopback-only
discovery, a random domain, the shipped loopback Fast DDS profile (shared memory for the data,
UDP bound to 127.0.0.1), a node process that is waited for and stopped like Ctrl-C. Used by
``infmllm-demo`` and the integration tests."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
# config/ in a source checkout; share/infmllm_ros/config once installed by colcon.
PROFILE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "config" / "fastdds_loopback.xml",
    Path(sys.prefix) / "share" / "infmllm_ros" / "config" / "fastdds_loopback.xml",
)


def domain_ids() -> range:
    """The ``ROS_DOMAIN_ID`` values :func:`ros_env` draws from: 1..101, or the slice
    ``INFMLLM_ROS_DOMAINS="LO-HI"`` names (a test run on several workers gives each its own, so
    their graphs never meet).

    Raises:
        ValueError: a slice that is not ``LO-HI`` inside 1..101.
    """
    lo, _, hi = os.environ.get("INFMLLM_ROS_DOMAINS", "1-101").partition("-")
    if not (lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 101):
        raise ValueError(f"INFMLLM_ROS_DOMAINS={os.environ['INFMLLM_ROS_DOMAINS']!r}: give LO-HI inside 1-101")
    return range(int(lo), int(hi) + 1)


def ros_env() -> dict:
    """Environment for a ROS process: LOCALHOST discovery, a random ROS_DOMAIN_ID of
    :func:`domain_ids`, the loopback Fast DDS profile when it is found."""
    env = dict(
        os.environ,
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(random.choice(domain_ids())),
        PYTHONUNBUFFERED="1",
    )
    profile = next((p for p in PROFILE_CANDIDATES if p.is_file()), None)
    if profile is not None:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
    return env


def start_node(
    tmp: Path,
    env: dict,
    params: dict,
    timeout_s: float = 180.0,
    ready: str = "ready: /ask",
    executable: Path = BIN / "infmllm-node",
):
    """Start ``executable`` (the venv's ``infmllm-node``, or an install space's ``infmllm_node``)
    with ``params`` (dotted names, written to ``tmp/params.yaml``) and wait for the log line
    holding ``ready`` (log in ``tmp/node.log``).

    Returns:
        ``(process, log_path)``.

    Raises:
        RuntimeError: the node exited or was not ready within ``timeout_s`` (message holds its log).
    """
    nested: dict = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        d = nested
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = value
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": nested}}))
    log_path = tmp / "node.log"
    proc = subprocess.Popen(
        [str(executable), "--ros-args", "--params-file", str(params_file)],
        env=env,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready in log_path.read_text():
            return proc, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"node did not start:\n{log_path.read_text()}")


def stop_node(proc, timeout_s: float = 30.0) -> int:
    """SIGINT the node like Ctrl-C and return its exit status (kills it after ``timeout_s``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


def run_tool(name: str, args: list, env: dict, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
    """Run one of the project's console scripts from the venv."""
    return subprocess.run(
        [str(BIN / name), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout_s
    )
