"""The torch reference math (the CUDA kernels' specification) against brute-force definitions."""

import pytest
import torch

from infmllm_ros.kvcache.reference import (
    chunk_column_scores,
    column_scores,
    kv_compact,
    saddle_select,
    visible_counts,
    window_scores,
)
from infmllm_ros.kvcache.rope import Rope


def brute_window_scores(q, k, q_start, scale, beta, normalise):
    """Per query, per head: loop over the definition (causal softmax with bias, then average)."""
    hq, w, _ = q.shape
    hkv, t, _ = k.shape
    g = hq // hkv
    out = torch.zeros(hkv, t, dtype=torch.float64)
    for h in range(hq):
        acc = torch.zeros(t, dtype=torch.float64)
        cnt = torch.zeros(t, dtype=torch.float64)
        for i in range(w):
            vis = q_start + i + 1
            logits = (k[h // g, :vis].double() @ q[h, i].double()) * scale
            logits = logits + beta * torch.arange(vis, dtype=torch.float64)
            acc[:vis] += torch.softmax(logits, 0)
            cnt[:vis] += 1
        out[h // g] += (acc / cnt.clamp(min=1) if normalise else acc) / g
    return out


@pytest.mark.parametrize("beta,normalise", [(0.0, True), (0.05, True), (0.0, False)])
def test_window_scores_match_definition(beta, normalise):
    torch.manual_seed(0)
    q = torch.randn(6, 5, 8)
    k = torch.randn(2, 20, 8)
    got = window_scores(q, k, q_start=15, scale=8**-0.5, beta=beta, normalise=normalise)
    ref = brute_window_scores(q, k, 15, 8**-0.5, beta, normalise)
    assert got.dtype == torch.float32 and got.shape == (2, 20)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


def test_attention_bias_moves_mass_to_newer_slots():
    torch.manual_seed(1)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 40, 8)
    plain = window_scores(q, k, 36, 0.3, beta=0.0)
    biased = window_scores(q, k, 36, 0.3, beta=0.1)
    # Old half loses score, new half gains.
    assert biased[:, :18].sum() < plain[:, :18].sum()
    assert biased[:, 18:36].sum() > plain[:, 18:36].sum()


def test_visible_counts():
    assert visible_counts(8, 4, 3).tolist() == [3, 3, 3, 3, 3, 2, 1, 0]


def test_gqa_mismatch_is_an_error():
    with pytest.raises(ValueError, match="multiple"):
        window_scores(torch.randn(5, 2, 8), torch.randn(2, 10, 8), 8, 1.0)
    with pytest.raises(ValueError, match="head_dim 8 != k head_dim 4"):
        window_scores(torch.randn(4, 2, 8), torch.randn(2, 10, 4), 8, 1.0)


def test_window_scores_default_to_no_bias_and_normalised_columns():
    torch.manual_seed(2)
    q, k = torch.randn(4, 3, 8), torch.randn(2, 12, 8)
    torch.testing.assert_close(window_scores(q, k, 9, 0.3), brute_window_scores(q, k, 9, 0.3, 0.0, True).float())


def test_mrope_angles_take_the_requested_dtype_and_refuse_positions_not_3_by_n():
    rope = Rope(8, 1e4, mrope_section=(1, 2, 1))
    cos, sin = rope.cos_sin_mrope(torch.zeros(3, 5, dtype=torch.int64), torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.bfloat16 and cos.shape == (5, 8)
    for bad in (torch.zeros(2, 5, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"must be \[3, n\], got"):
            rope.cos_sin_mrope(bad, torch.float32)
    with pytest.raises(ValueError, match="need an M-RoPE"):
        Rope(8, 1e4).cos_sin_mrope(torch.zeros(3, 5, dtype=torch.int64), torch.float32)


def test_saddle_select_keeps_sinks_recent_and_top_scores():
    scores = torch.tensor([[0.0, 0.0, 5.0, 1.0, 9.0, 2.0, 0.5, 0.0, 0.0, 0.0]])
    keep = saddle_select(scores, sinks=2, recent=2, budget=6)
    assert keep.tolist() == [[0, 1, 2, 4, 8, 9]]


def test_saddle_select_ties_go_to_lower_slot_and_rows_are_independent():
    scores = torch.stack([torch.ones(12), torch.arange(12.0)])  # all-equal row, increasing row
    keep = saddle_select(scores, sinks=1, recent=1, budget=5)
    assert keep[0].tolist() == [0, 1, 2, 3, 11]  # ties: lowest slots win
    assert keep[1].tolist() == [0, 8, 9, 10, 11]  # highest scores win


def test_saddle_select_edge_counts():
    s = torch.randn(2, 3, 10)
    assert saddle_select(s, 4, 5, 9).tolist() == [[[0, 1, 2, 3, 5, 6, 7, 8, 9]] * 3] * 2
    assert saddle_select(s, 0, 9, 9)[0, 0].tolist() == list(range(1, 10))
    with pytest.raises(ValueError, match="exceed the budget"):
        saddle_select(s, 5, 5, 9)
    with pytest.raises(ValueError, match="smaller than the row length"):
        saddle_select(s, 1, 1, 10)


def test_kv_compact_rerotates_keys_to_their_new_slots():
    torch.manual_seed(2)
    rope = Rope(16, 10000.0)
    layers, heads, slots, d = 2, 3, 24, 16
    raw = torch.randn(layers, heads, slots, d)
    cos, sin = rope.cos_sin(torch.arange(slots), torch.float32)
    k = Rope.apply(raw, cos, sin)  # keys stored post-RoPE at their slot
    v = torch.randn(layers, heads, slots, d)
    meta = torch.arange(slots).repeat(layers, heads, 1)
    keep = torch.sort(torch.stack([torch.randperm(slots)[:10] for _ in range(layers * heads)]), -1).values
    keep = keep.reshape(layers, heads, 10)
    expect_raw = torch.gather(raw, 2, keep[..., None].expand(-1, -1, -1, d))
    expect_v = torch.gather(v, 2, keep[..., None].expand(-1, -1, -1, d))
    kv_compact(k, v, keep, rope, (meta,))
    c10, s10 = rope.cos_sin(torch.arange(10), torch.float32)
    torch.testing.assert_close(k[:, :, :10], Rope.apply(expect_raw, c10, s10), atol=1e-5, rtol=1e-5)
    assert torch.equal(v[:, :, :10], expect_v)
    assert torch.equal(meta[:, :, :10], keep)


def test_kv_compact_rejects_out_of_range_indices_and_mismatched_shapes():
    k = torch.zeros(1, 1, 8, 4)
    for bad in (9, 8, -1):  # slot 8 is one past the last of 8
        with pytest.raises(ValueError, match="keep indices out of the buffer's slot range"):
            kv_compact(k, k.clone(), torch.tensor([[[0, bad]]]), None)
    kv_compact(k, k.clone(), torch.tensor([[[0, 7]]]), None)
    with pytest.raises(ValueError, match=r"K \(1, 1, 8, 4\) and V \(1, 1, 6, 4\) differ"):
        kv_compact(k, torch.zeros(1, 1, 6, 4), torch.tensor([[[0, 1]]]), None)
    with pytest.raises(ValueError, match=r"keep rows \(2, 1\) != buffer rows \(1, 1\)"):
        kv_compact(k, k.clone(), torch.tensor([[[0, 1]], [[0, 1]]]), None)


def test_saddle_select_refuses_negative_counts_and_takes_zero():
    s = torch.randn(1, 1, 10)
    for sinks, recent in ((-1, 0), (0, -1)):
        with pytest.raises(ValueError, match=rf"sinks \({sinks}\) and recent \({recent}\) must be >= 0"):
            saddle_select(s, sinks, recent, 5)
    assert saddle_select(s, 0, 0, 3)[0, 0].tolist() == sorted(torch.topk(s[0, 0], 3).indices.tolist())


def test_column_scores_default_to_no_bias_and_normalised_columns():
    torch.manual_seed(6)
    q, k = torch.randn(4, 3, 8), torch.randn(2, 12, 8)
    logits = (q.reshape(2, 2, 3, 8) @ k.transpose(1, 2)[:, None]) * 0.3
    torch.testing.assert_close(column_scores(logits, 9), brute_window_scores(q, k, 9, 0.3, 0.0, True).float())


def test_rope_refuses_bad_shapes_and_bases_with_the_reason():
    for kwargs, message in (
        (dict(head_dim=7, theta=1e4), "head_dim must be even, got 7"),
        (dict(head_dim=8, theta=0.0), "theta must be positive, got 0.0"),
        (dict(head_dim=8, theta=1e4, mrope_section=(2, 2)), "three sizes summing to head_dim/2 = 4$"),
        (dict(head_dim=8, theta=1e4, mrope_section=(1, 1, 1)), "three sizes summing"),
        (dict(head_dim=8, theta=1e4, mrope_section=(-1, 3, 2)), "three sizes summing"),
    ):
        with pytest.raises(ValueError, match=message):
            Rope(**kwargs)
    Rope(8, 0.5)  # any positive base
    Rope(8, 1e4, mrope_section=(0, 2, 2))  # an axis may get no frequencies


@pytest.mark.parametrize("w", [1, 5])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalise", [True, False])
def test_chunk_column_scores_are_column_scores_bit_for_bit(w, beta, normalise):
    """The cache's CPU window scores (tables precomputed, mask on the chunk's corner only) give
    exactly the bits of the reference, for a decoded token (W = 1) and a chunk."""
    t = 37
    logits = torch.randn(3, 2, w, t, generator=torch.Generator().manual_seed(w))
    before = logits.clone()
    slot_bias = beta * torch.arange(t + 8).to(torch.float32) if beta else None
    causal = torch.ones(8, 8, dtype=torch.bool).triu(1)
    viewers = visible_counts(t, t - w, w).clamp(min=1.0) if normalise else None
    got = chunk_column_scores(logits, slot_bias, causal, viewers)
    assert torch.equal(got, column_scores(logits, t - w, beta, normalise))
    assert torch.equal(logits, before)  # the model's logits are not touched
