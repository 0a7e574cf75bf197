"""launch/orin.launch.py against a *recording stand-in* for launch / launch_ros.

`ros2 launch` (the launch and launch_ros packages) is not installable from PyPI, so this test
does not run ROS launch. It imports the launch file with minimal stand-in modules that record
what the file asks for, then checks that against the real project: the package name in
package.xml, the console script in setup.py, the parameter file against the node's declared
parameters (and their validation), the remapping against the configured topics, and the Fast DDS
profiles. On a robot, `ros2 launch infmllm_ros orin.launch.py` runs the same file for real.
"""

import ast
import importlib.util
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from infmllm_ros.ros.params import PARAMETERS, flatten_parameters, validate
from infmllm_ros.ros.shared_memory import FASTDDS, MIB, segment_sizes, with_segment_size

ROOT = Path(__file__).resolve().parents[1]


class Recorded:
    """A stand-in launch entity: keeps its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    pass


def stand_in_modules() -> dict:
    mods = {
        name: types.ModuleType(name)
        for name in (
            "launch",
            "launch.actions",
            "launch.substitutions",
            "launch_ros",
            "launch_ros.actions",
            "ament_index_python",
            "ament_index_python.packages",
        )
    }
    mods["launch"].LaunchDescription = Recorded
    mods["launch.actions"].DeclareLaunchArgument = Recorded
    mods["launch.actions"].SetEnvironmentVariable = Recorded
    mods["launch.substitutions"].LaunchConfiguration = LaunchConfiguration
    mods["launch_ros.actions"].LifecycleNode = Recorded
    # The installed share directory holds the repository's config/ (setup.py data_files).
    mods["ament_index_python.packages"].get_package_share_directory = lambda pkg: (
        str(ROOT) if pkg == "infmllm_ros" else pytest.fail(f"unknown package {pkg}")
    )
    return mods


@pytest.fixture
def launched(monkeypatch):
    for name, mod in stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("orin_launch", ROOT / "launch" / "orin.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entities = module.generate_launch_description().args[0]
    args = {e.args[0]: e.kwargs for e in entities if "default_value" in e.kwargs}
    nodes = [e for e in entities if "executable" in e.kwargs]
    env = {e.args[0]: e.args[1] for e in entities if len(e.args) == 2}
    assert len(nodes) == 1
    return args, nodes[0].kwargs, env


def resolve(value, args):
    return args[value.args[0]]["default_value"] if isinstance(value, LaunchConfiguration) else value


def console_scripts() -> set:
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and " = infmllm_ros." in node.value:
            scripts.add(node.value.split(" = ")[0])
    return scripts


def ros_parameters(path: Path) -> dict:
    return flatten_parameters(yaml.safe_load(path.read_text()))


def test_node_package_and_executable_match_the_package(launched):
    _, node, _ = launched
    package = ET.parse(ROOT / "package.xml").getroot().findtext("name")
    assert node["package"] == package == "infmllm_ros"
    assert node["executable"] in console_scripts()


def test_parameter_file_declares_only_known_parameters_and_validates(launched):
    args, node, _ = launched
    params_file = Path(resolve(node["parameters"][0], args))
    assert params_file.is_file()
    values = ros_parameters(params_file)
    assert set(values) <= {p.name for p in PARAMETERS} and values
    assert validate(values).cache_policy == "inf_mllm"
    assert set(node["parameters"][1]) == {"use_sim_time", "autostart"}
    assert resolve(node["parameters"][1]["autostart"], args) == "true" and node["name"] == "infmllm"


def test_remapped_camera_topic_is_one_the_node_subscribes(launched):
    args, node, _ = launched
    values = ros_parameters(Path(resolve(node["parameters"][0], args)))
    ((source, target),) = node["remappings"]
    assert source in values["camera_topics"]
    assert resolve(target, args) == source  # default: no remapping
    assert resolve(node["namespace"], args) == ""


def test_fastdds_profiles_give_the_node_a_segment_that_fits_a_containers_shm_and_cameras_one_for_4k(launched):
    args, _, env = launched
    node_profile = Path(resolve(env["FASTDDS_DEFAULT_PROFILES_FILE"], args))
    (node_segment,) = segment_sizes(node_profile)
    assert node_segment + 8 * MIB <= 64_000_000  # docker's default /dev/shm, with room for the ports
    (camera_segment,) = segment_sizes(node_profile.with_name("fastdds_shm_camera.xml"))
    assert camera_segment >= 2 * 3840 * 2160 * 4  # a bgra8 4K frame's fragments in flight, twice


def test_the_test_profile_binds_udp_to_loopback_only(tmp_path):
    from infmllm_ros.tools.processes import ros_env

    profile = Path(ros_env()["FASTDDS_DEFAULT_PROFILES_FILE"])

    def udp_addresses(path: Path) -> list[list[str]]:
        return [
            [a.text for a in t.iter(f"{FASTDDS}address")]
            for t in ET.parse(path).getroot().iter(f"{FASTDDS}transport_descriptor")
            if t.findtext(f"{FASTDDS}type") == "UDPv4"
        ]

    assert udp_addresses(profile) == [["127.0.0.1"]]
    assert segment_sizes(profile) == segment_sizes(ROOT / "config" / "fastdds_shm.xml")
    camera = with_segment_size(profile, 64 * MIB, tmp_path / "camera.xml")
    assert segment_sizes(camera) == [64 * MIB] and udp_addresses(camera) == [["127.0.0.1"]]


@pytest.mark.parametrize("name", ["orin.yaml", "desktop.yaml"])
def test_shipped_parameter_files_validate(name):
    values = ros_parameters(ROOT / "config" / name)
    assert set(values) <= {p.name for p in PARAMETERS}
    validate(values)


SOCKETS = """
import os, time, rclpy
rclpy.init()
node = rclpy.create_node("socket_probe")
time.sleep(1.0)
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:  # the listing's own descriptor
        continue
    if target.startswith("socket:"):
        inodes.add(target[8:-1])
for line in open("/proc/self/net/udp").read().splitlines()[1:]:
    fields = line.split()
    if fields[9] in inodes:
        print(fields[1])
"""


def test_every_receiving_udp_socket_of_the_loopback_profile_is_bound_to_127_0_0_1():
    """Fast DDS under the loopback profile: the domain's discovery and user ports (7400 + 250 x
    domain + offset) and its port 7000 listen on 127.0.0.1 only; what else it opens is a
    send-only socket on an ephemeral port (bench/results/README.md, "Limits as shipped")."""
    import subprocess
    import sys

    from infmllm_ros.tools.processes import ros_env

    env = ros_env()
    out = subprocess.run([sys.executable, "-c", SOCKETS], env=env, capture_output=True, text=True, timeout=60)
    sockets = []
    for local in out.stdout.split():
        addr, port = local.split(":")
        sockets.append((".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16)))
    base = 7400 + 250 * int(env["ROS_DOMAIN_ID"])
    listening = [(a, p) for a, p in sockets if base <= p < base + 250 or p == 7000]
    assert len(listening) >= 2 and all(a == "127.0.0.1" for a, _ in listening), sockets
    others = [(a, p) for a, p in sockets if a != "127.0.0.1"]
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert len(others) <= 2 and all(p >= low for _, p in others), sockets


SHARED_MEMORY = """
import rclpy
from infmllm_ros.ros.shared_memory import transport_status
rclpy.init()
node = rclpy.create_node("shm_probe")
print(transport_status())
"""


def test_a_participant_says_whether_it_got_its_shared_memory_segment(tmp_path):
    """Under the loopback profile a process gets its segment; with the shared-memory transport
    left out (as when its segment does not fit in /dev/shm) it runs over UDP only, and
    :func:`transport_status` says so, how much /dev/shm is free and what to do."""
    import subprocess
    import sys

    from infmllm_ros.tools.processes import ros_env

    env = ros_env()
    profile = Path(env["FASTDDS_DEFAULT_PROFILES_FILE"])

    def status(profile: Path) -> str:
        run_env = dict(env, FASTDDS_DEFAULT_PROFILES_FILE=str(profile))
        out = subprocess.run([sys.executable, "-c", SHARED_MEMORY], env=run_env, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1]

    assert status(profile) == "on"
    tree = ET.parse(profile)
    for transports in tree.getroot().iter(f"{FASTDDS}userTransports"):
        for t in list(transports):
            if t.text == "shm":
                transports.remove(t)
    ET.register_namespace("", FASTDDS[1:-1])
    tree.write(tmp_path / "udp_only.xml")
    off = status(tmp_path / "udp_only.xml")
    assert off.startswith("off: no Fast DDS shared-memory segment (/dev/shm has ")
    assert "the profile asks for 16 MiB" in off and "--shm-size" in off
