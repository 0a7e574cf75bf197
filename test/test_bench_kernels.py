"""infmllm-bench-kernels: refuses clearly without a GPU (the figures come from an NVIDIA H100 80GB)."""

import pytest
import torch

from infmllm_ros.bench import kernels as bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_cuda(tmp_path, capsys):
    assert bench.main(["--json", str(tmp_path / "k.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()


def test_compact_bytes_scale_with_kept_slots_and_dtype():
    """The bandwidth figures divide these bytes by time: K and V are read and written once."""
    small = bench.step_bytes(30, 3, 64, 2, length=1088, budget=1024, queries=576)["kv_compact"]
    large = bench.step_bytes(30, 3, 64, 2, length=4160, budget=4096, queries=576)["kv_compact"]
    fp32 = bench.step_bytes(30, 3, 64, 4, length=4160, budget=4096, queries=576)["kv_compact"]
    assert large == 4 * small
    kv = 2 * 2 * 90 * 4096 * 64 * 2
    assert fp32 - large == kv  # doubling the element size adds exactly the K/V traffic again
