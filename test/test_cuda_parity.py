"""CUDA kernels vs the torch reference. Argument checks run everywhere; parity needs a GPU.

The parity tests skip where CUDA is absent (as on CI); on a GPU machine run
``python3 -m pytest test/test_cuda_parity.py`` (bench/results/kernels_h100.md records the H100 run).
"""

import pytest
import torch

from infmllm_ros.kvcache import kernels, reference
from infmllm_ros.kvcache.rope import Rope

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device: kernel parity runs on a GPU machine only")


def meta(shape, device="cpu"):
    return (
        torch.arange(shape[2], device=device).repeat(*shape[:2], 1).contiguous(),
        torch.zeros(shape, dtype=torch.int8, device=device),
        torch.zeros(shape, dtype=torch.int32, device=device),
        torch.zeros(shape, dtype=torch.float64, device=device),
        torch.zeros(shape, dtype=torch.float32, device=device),
    )


@pytest.mark.parametrize(
    "mutate,error",
    [
        (lambda k, v, keep: (k.double(), v.double(), keep), "float16 or float32"),
        (lambda k, v, keep: (k, v[:, :, :-1], keep), "must be equal"),
        (lambda k, v, keep: (k.transpose(2, 3).contiguous().transpose(2, 3), v, keep), "contiguous"),
        (lambda k, v, keep: (k, v, keep.int()), "keep must be int64"),
        (lambda k, v, keep: (k, v, torch.zeros(2, 3, 40, dtype=torch.int64)), "more than the buffer"),
        (lambda k, v, keep: (k, v, keep.to("meta")), "on one device"),
    ],
)
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


def window_inputs(layers, q_heads, kv_heads, head_dim, window, slots, dtype, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(layers, q_heads, window, head_dim, generator=g).to(dtype)
    k = torch.randn(layers, kv_heads, slots, head_dim, generator=g).to(dtype)
    return q.to(device), k.to(device)


@pytest.mark.parametrize(
    "change,error",
    [
        (dict(dtype=torch.float64), "float16 or float32"),
        (dict(head_dim=48), "supports head_dim"),
        (dict(q_heads=8), "not a multiple"),
        (dict(window=41), "must lie inside length"),
        (dict(window=1024), "exceed 2048 queries"),
    ],
)
def test_window_arguments_are_checked_before_launch(change, error):
    kw = dict(layers=2, q_heads=9, kv_heads=3, head_dim=64, window=8, length=40, slots=48, dtype=torch.float32)
    kw.update(change)
    length = kw.pop("length")
    q, k = window_inputs(**kw)
    with pytest.raises(ValueError, match=error):
        kernels.check_window_args(q, k, length, length - kw["window"], None)
    q, k = window_inputs(2, 9, 3, 64, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.check_window_args(q.transpose(2, 3), k, 40, 32, None)
    with pytest.raises(ValueError, match="out must be contiguous float32"):
        kernels.check_window_args(q, k, 40, 32, torch.zeros(2, 3, 48, dtype=torch.float16))


@needs_gpu
@pytest.mark.parametrize("shape", [(4, 9, 3, 64), (3, 12, 2, 128), (2, 4, 4, 32), (2, 8, 2, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "window,beta,normalise,decay",
    [(32, 1e-2, True, 0.0), (1, 0.0, True, 0.9), (64, 0.0, False, 1.0), (7, 1e-3, True, 0.5)],
)
def test_window_scores_match_reference(shape, dtype, window, beta, normalise, decay):
    layers, q_heads, kv_heads, head_dim = shape
    slots, length = 1100, 1037  # several key tiles, the last one partial; slots beyond length unscored
    q, k = window_inputs(layers, q_heads, kv_heads, head_dim, window, slots, dtype)
    q_start, scale = length - window, head_dim**-0.5
    carry = torch.rand(layers, kv_heads, slots, generator=torch.Generator().manual_seed(3))
    want = carry.clone()
    for layer in range(layers):
        fresh = reference.window_scores(q[layer], k[layer, :, :length], q_start, scale, beta, normalise)
        want[layer, :, :length] = fresh + (decay * carry[layer, :, :length] if decay else 0)
    got = kernels.window_scores(
        q.cuda(), k.cuda(), length, q_start, scale, beta, normalise, out=carry.cuda(), decay=decay
    )
    torch.testing.assert_close(got.cpu(), want, atol=2e-6, rtol=1e-4)


@needs_gpu
def test_window_scores_inside_the_cache_match_cpu():
    """An inf_mllm KVCache on CUDA (head_dim 64: the kernel path) scores as the CPU one does."""
    from infmllm_ros.kvcache import KVCache, make_policy

    def cache(device):
        return KVCache(
            layers=2,
            kv_heads=3,
            head_dim=64,
            capacity=96,
            max_chunk=16,
            policy=make_policy("inf_mllm", sinks=4, recent=16),
            rope=Rope(64, 1e5),
            device=device,
        )

    cpu, gpu = cache("cpu"), cache("cuda")
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # 64 tokens: no eviction, so both hold the same keys
        q, kk, vv = (torch.randn(h, 16, 64, generator=g) for h in (9, 3, 3))
        for c in (cpu, gpu):
            c.begin_chunk(16)
            for layer in range(2):
                dev = c.k.device
                c.attend(layer, q.to(dev), kk.to(dev), vv.to(dev))
            c.commit()
    torch.testing.assert_close(gpu.scores[:, :, :64].cpu(), cpu.scores[:, :, :64], atol=1e-5, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize(
    "case",
    [
        "random",
        "ties",
        "all_equal",
        "signed_zero",
        "negative",
        "huge_range",
        "window_one",
        "no_topk",
        "edge",
        "long_row",
    ],
)
def test_saddle_select_indices_identical(case):
    g = torch.Generator().manual_seed(0)
    slots, length, sinks, recent, budget = 4160, 4096 + 33, 4, 256, 1024
    s = torch.randn(30, 3, slots, generator=g)
    if case == "ties":
        s = torch.randint(0, 4, (30, 3, slots), generator=g).float()
    elif case == "all_equal":
        s = torch.ones(30, 3, slots)
    elif case == "signed_zero":  # -0.0 == +0.0 in torch.sort: ties broken by slot, not by sign bit
        s = torch.tensor([0.0, -0.0, 1.0, -1.0])[torch.randint(0, 4, (30, 3, slots), generator=g)]
    elif case == "negative":
        s = s - 100.0
    elif case == "huge_range":
        s = s * torch.logspace(-30, 30, slots)
    elif case == "long_row":
        slots = length = 16384 + 64
        budget, recent = 16384, 4096
        s = torch.randn(30, 3, slots, generator=g)
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
def test_vision_budget_selection_identical():
    """A vision budget lifts reserved scores to 1e30; the radix select must rank them as torch does."""
    from infmllm_ros.kvcache import SlotKind, make_policy

    g = torch.Generator().manual_seed(1)
    length, budget = 1088, 1024
    scores = torch.rand(30, 3, length, generator=g)
    kind = torch.where(torch.rand(30, 3, length, generator=g) < 0.05, int(SlotKind.VISION), int(SlotKind.TEXT))
    pol = make_policy("inf_mllm", sinks=40, recent=256, vision_budget=32)
    ref = pol.select(scores, (30, 3), length, budget, torch.device("cpu"), kind.to(torch.int8))
    got = pol.select(scores.cuda(), (30, 3), length, budget, torch.device("cuda"), kind.to(torch.int8).cuda())
    assert torch.equal(got.cpu(), ref)


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize(
    "head_dim,slots,kept",
    [
        (128, 4096 + 64, 4096),  # 1.5B-class row, one chunk of 64 evicted
        (64, 4096 + 64, 4096),  # SmolLM2 row
        (64, 2000, 700),  # most slots evicted: shifts span many tiles
        (32, 300, 299),  # one slot evicted
        (16, 100, 1),  # tiny head_dim (more slots per tile than threads would allow)
    ],
)
@pytest.mark.parametrize("seed", range(3))  # the in-place tile protocol, under different keep sets
def test_kv_compact_matches_reference(dtype, tol, head_dim, slots, kept, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (7, 2, slots, head_dim)
    k = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    keep = torch.sort(torch.rand(7, 2, slots, generator=g).argsort(-1)[..., :kept], -1).values
    rope = Rope(head_dim, 1e6)
    scores = torch.rand(shape[:3], generator=g)
    ref_k, ref_v, ref_meta = k.clone(), v.clone(), meta(shape[:3])[:4] + (scores.clone(),)
    reference.kv_compact(ref_k, ref_v, keep, rope, ref_meta)
    gk, gv, gmeta = k.cuda(), v.cuda(), tuple(m.cuda() for m in meta(shape[:3])[:4] + (scores,))
    kernels.kv_compact(gk, gv, keep.cuda(), rope, gmeta)
    torch.testing.assert_close(gk[:, :, :kept].cpu().float(), ref_k[:, :, :kept].float(), atol=tol, rtol=tol)
    assert torch.equal(gv[:, :, :kept].cpu(), ref_v[:, :, :kept])
    for a, b in zip(gmeta, ref_meta):
        assert torch.equal(a[:, :, :kept].cpu(), b[:, :, :kept])


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
