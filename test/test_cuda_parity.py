"""CUDA kernels vs the torch reference. Argument checks run everywhere; parity needs a GPU.

The parity tests skip where CUDA is absent (as on CI). They have not yet run on a GPU.
"""
import pytest
import torch

from infmllm_ros.kvcache import kernels, reference
from infmllm_ros.kvcache.rope import Rope

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device: kernel parity runs on a GPU machine only")


def meta(shape, device="cpu"):
    return (torch.arange(shape[2], device=device).repeat(*shape[:2], 1).contiguous(),
            torch.zeros(shape, dtype=torch.int8, device=device), torch.zeros(shape, dtype=torch.int32, device=device),
            torch.zeros(shape, dtype=torch.float64, device=device), torch.zeros(shape, dtype=torch.float32, device=device))


@pytest.mark.parametrize("mutate,error", [
    (lambda k, v, keep: (k.double(), v.double(), keep), "float16 or float32"),
    (lambda k, v, keep: (k, v[:, :, :-1], keep), "must be equal"),
    (lambda k, v, keep: (k.transpose(2, 3).contiguous().transpose(2, 3), v, keep), "contiguous"),
    (lambda k, v, keep: (k, v, keep.int()), "keep must be int64"),
    (lambda k, v, keep: (k, v, torch.zeros(2, 3, 40, dtype=torch.int64)), "more than the buffer"),
    (lambda k, v, keep: (k, v, keep.to("meta")), "on one device"),
])
def test_compact_arguments_are_checked_before_launch(mutate, error):
    k, v = torch.zeros(2, 3, 32, 8), torch.zeros(2, 3, 32, 8)
    keep = torch.zeros(2, 3, 16, dtype=torch.int64)
    k, v, keep = mutate(k, v, keep)
    with pytest.raises(ValueError, match=error):
        kernels.check_compact_args(k, v, keep, meta((2, 3, 32))[:4])


def test_select_arguments_are_checked_before_launch():
    s = torch.zeros(2, 3, 64)
    with pytest.raises(ValueError, match="smaller than the row length"):
        kernels.check_select_args(s, 32, 4, 4, 32)  # k larger than the row
    with pytest.raises(ValueError, match="exceed the budget"):
        kernels.check_select_args(s, 64, 20, 20, 32)
    with pytest.raises(ValueError, match="float32"):
        kernels.check_select_args(s.half(), 64, 4, 4, 32)
    with pytest.raises(ValueError, match="outside 1..64"):
        kernels.check_select_args(s, 65, 4, 4, 32)


@needs_gpu
@pytest.mark.parametrize("case", ["random", "ties", "all_equal", "window_one", "no_topk", "edge"])
def test_saddle_select_indices_identical(case):
    g = torch.Generator().manual_seed(0)
    slots, length, sinks, recent, budget = 4160, 4096 + 33, 4, 256, 1024
    s = torch.randn(30, 3, slots, generator=g)
    if case == "ties":
        s = torch.randint(0, 4, (30, 3, slots), generator=g).float()
    elif case == "all_equal":
        s = torch.ones(30, 3, slots)
    elif case == "window_one":
        length = budget + 1
    elif case == "no_topk":
        recent = budget - sinks
    elif case == "edge":
        sinks, recent, budget, length = 0, 0, 1, 2
    ref = reference.saddle_select(s[..., :length], sinks, recent, budget)
    got = kernels.saddle_select(s.cuda().contiguous(), length, sinks, recent, budget)
    assert torch.equal(got.cpu(), ref)


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kv_compact_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(1)
    shape = (28, 2, 4096 + 64, 128)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    keep = torch.sort(torch.rand(28, 2, 4096 + 64, generator=g).argsort(-1)[..., :4096], -1).values
    rope = Rope(128, 1e6)
    ref_k, ref_v, ref_meta = k.clone(), v.clone(), meta(shape[:3])
    reference.kv_compact(ref_k, ref_v, keep, rope, ref_meta)
    gk, gv, gmeta = k.cuda(), v.cuda(), meta(shape[:3], "cuda")
    kernels.kv_compact(gk, gv, keep.cuda(), rope, gmeta)
    torch.testing.assert_close(gk[:, :, :4096].cpu().float(), ref_k[:, :, :4096].float(), atol=tol, rtol=tol)
    assert torch.equal(gv[:, :, :4096].cpu(), ref_v[:, :, :4096])
    for a, b in zip(gmeta, ref_meta):
        assert torch.equal(a[:, :, :4096].cpu(), b[:, :, :4096])


@needs_gpu
@pytest.mark.parametrize("policy", ["window", "streaming_llm"])
def test_streaming_on_cuda_matches_cpu(policy):
    """The whole eviction step (selection + compaction kernels) inside a real stream.

    Score-free policies only: GPU and CPU attention round differently, so score-based policies
    may legitimately pick different near-tied slots; their selection is checked index for index
    on identical scores above.
    """
    from test_cache import stream_logits, tiny_decoder

    from infmllm_ros.kvcache import make_policy

    cpu = tiny_decoder()
    gpu = tiny_decoder().cuda()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(4))
    ref = stream_logits(cpu, cpu.new_cache(48, 8, make_policy(policy, sinks=4, recent=8)), ids, 8)
    got = stream_logits(gpu, gpu.new_cache(48, 8, make_policy(policy, sinks=4, recent=8)), ids.cuda(), 8)
    torch.testing.assert_close(got.cpu(), ref, atol=1e-3, rtol=1e-3)
