"""Build ``infmllm_interfaces`` with plain CMake against the ROS 2 wheels installed in a venv.

Run with the venv's interpreter: ``.venv/bin/python interfaces/build_in_venv.py``. On a robot
with a ROS install use ``colcon build --base-paths . interfaces`` instead (README).

The ``ros-kilted-*`` wheels are built in a manylinux container, and their
``export_*__rosidl_generator_pyExport.cmake`` files name that container's Python and NumPy
include directories (``/opt/python/cp311-cp311/...``). CMake refuses imported targets whose
include directories do not exist, so those two paths are rewritten to this interpreter's before
configuring. Everything installs into the venv prefix (``share/``, ``lib/``, ``site-packages``),
where the wheels' ``ros_wheels_bootstrapper`` already puts ``<venv>/lib`` on ``LD_LIBRARY_PATH``.

Raises ``SystemExit`` with CMake's exit status when a step fails.
"""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy

PACKAGE = Path(__file__).resolve().parent / "infmllm_interfaces"
FOREIGN_PYTHON_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+")
FOREIGN_NUMPY_INCLUDE = re.compile(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include")


def fix_wheel_exports(prefix: Path) -> int:
    """Point the wheels' rosidl Python export files at this interpreter's include dirs.

    Returns the number of files rewritten (0 when already fixed).
    """
    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = 0
    for path in prefix.glob("share/*/cmake/export_*__rosidl_generator_pyExport.cmake"):
        text = path.read_text()
        fixed = FOREIGN_NUMPY_INCLUDE.sub(numpy_include, text)
        fixed = FOREIGN_PYTHON_INCLUDE.sub(python_include, fixed)
        if fixed != text:
            path.write_text(fixed)
            changed += 1
    return changed


def run(cmd: list, env: dict) -> None:
    """Run one build step, exiting with its status on failure."""
    print("+", " ".join(cmd), flush=True)
    status = subprocess.call(cmd, env=env)
    if status:
        sys.exit(status)


def main() -> None:
    prefix = Path(sys.prefix)
    if prefix == Path(sys.base_prefix):
        sys.exit("build_in_venv.py: run it with the project venv's python, not the system one")
    print(f"fixed foreign include dirs in {fix_wheel_exports(prefix)} wheel export files")
    build = prefix / "build" / "infmllm_interfaces"
    env = dict(
        os.environ,
        AMENT_PREFIX_PATH=str(prefix),
        CMAKE_PREFIX_PATH=str(prefix),
        PATH=f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    run(
        [
            "cmake",
            "-S",
            str(PACKAGE),
            "-B",
            str(build),
            f"-DCMAKE_INSTALL_PREFIX={prefix}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DBUILD_TESTING=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        env,
    )
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], env)
    run(["cmake", "--install", str(build)], env)


if __name__ == "__main__":
    main()
