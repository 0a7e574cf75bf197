"""Shared set-up for tests that start ROS processes: loopback-only discovery, a random domain,
the shipped shared-memory Fast DDS profile, and a node process that is waited for and stopped."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ros_env() -> dict:
    """Environment for a ROS process: LOCALHOST discovery, a random ROS_DOMAIN_ID in 1..101."""
    return dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(random.randint(1, 101)),
                FASTDDS_DEFAULT_PROFILES_FILE=str(ROOT / "config" / "fastdds_shm.xml"), PYTHONUNBUFFERED="1")


def start_node(tmp: Path, env: dict, params: dict, timeout_s: float = 180.0):
    """Start ``infmllm-node`` with ``params`` (dotted names) and wait for its "ready" log line.

    Returns:
        ``(process, log_path)``. Raises AssertionError (with the log) if it exits or times out.
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
    proc = subprocess.Popen([str(BIN / "infmllm-node"), "--ros-args", "--params-file", str(params_file)],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "ready: /ask" in log_path.read_text():
            return proc, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"node did not start:\n{log_path.read_text()}")


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
    return subprocess.run([str(BIN / name), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
