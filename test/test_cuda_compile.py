"""Every CUDA kernel compiles for Orin (sm_87) and Hopper (sm_90); no GPU needed.

Two compilers: ``nvcc`` on each ``.cu`` file, and NVRTC (from the ``nvidia-cuda-nvrtc`` wheel) on
exactly the translation unit ``kernels.py`` hands to CuPy/PyCUDA at run time. NVRTC has no C
library headers, so code that builds with nvcc can still fail to load on the robot; the first
run on a GPU failed that way (``stdint.h``, ``INFINITY``), hence the second test.
"""

import ctypes
import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from infmllm_ros.kvcache.kernels import SOURCES, cuda_dir, kernel_source

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI machines have it)")


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include folder (for cuda_fp16.h), from CUDA_HOME/CUDA_PATH or /usr/local."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *sorted(glob.glob("/usr/local/cuda*"))]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_fp16.h").is_file():
            return str(Path(root) / "include")
    return None


def nvrtc_library():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (its builtins loaded first), or None."""
    try:
        import nvidia.cu13
    except ImportError:
        return None
    lib = Path(nvidia.cu13.__path__[0]) / "lib"
    builtins = sorted(lib.glob("libnvrtc-builtins.so.*"))
    if not builtins or not (lib / "libnvrtc.so.13").is_file():
        return None
    ctypes.CDLL(str(builtins[0]), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(lib / "libnvrtc.so.13"))


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("source", SOURCES)
def test_kernel_compiles_with_nvcc(tmp_path, arch, source):
    proc = subprocess.run(
        [
            NVCC,
            f"-arch={arch}",
            "--std=c++17",
            "-Werror",
            "all-warnings",
            "-c",
            str(cuda_dir() / source),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES)
def test_kernels_keep_their_state_in_registers(tmp_path, source):
    """No kernel uses a stack frame or spills on Orin: local memory would cost DRAM traffic.

    (kv_compact once kept its fp16 tile in local memory because a loop was not unrolled.)
    """
    proc = subprocess.run(
        [
            NVCC,
            "-arch=sm_87",
            "--std=c++17",
            "--resource-usage",
            "-c",
            str(cuda_dir() / source),
            "-o",
            str(tmp_path / "k.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    frames = [line for line in proc.stderr.splitlines() if "stack frame" in line]
    assert frames, proc.stderr
    for line in frames:
        assert line.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"), proc.stderr


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_runtime_unit_compiles_with_nvrtc(arch):
    lib, include = nvrtc_library(), cuda_include_dir()
    if lib is None or include is None:
        pytest.skip("needs the nvidia-cuda-nvrtc wheel (requirements.txt) and a CUDA include folder")
    prog = ctypes.c_void_p()
    assert (
        lib.nvrtcCreateProgram(ctypes.byref(prog), kernel_source().encode(), b"infmllm_kernels.cu", 0, None, None) == 0
    )
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", f"-I{include}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode()
