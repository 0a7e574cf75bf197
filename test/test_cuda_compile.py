"""Every CUDA kernel compiles with nvcc for Orin (sm_87) and Hopper (sm_90); no GPU needed."""
import shutil
import subprocess

import pytest

from infmllm_ros.kvcache.kernels import SOURCES, cuda_dir, kernel_source

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (CI machines have it)")


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("source", [*SOURCES, "<nvrtc unit>"])
def test_kernel_compiles(tmp_path, arch, source):
    if source == "<nvrtc unit>":  # exactly what kernels.py hands to NVRTC
        src = tmp_path / "unit.cu"
        src.write_text(kernel_source())
    else:
        src = cuda_dir() / source
    proc = subprocess.run([NVCC, f"-arch={arch}", "--std=c++17", "-Werror", "all-warnings", "-c", str(src),
                           "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
