"""VLM streams under inf_mllm eviction: M-RoPE positions survive compaction (Qwen2.5-VL); memory and
per-frame cost stay flat over an hour of frames (Qwen2.5-VL, Qwen3-VL, InternVL3).

The reference for re-rotated keys is independent of the cache's code: the raw (pre-RoPE) keys
that layer 0's ``k_proj`` produced, rotated by transformers' own ``Qwen2_5_VLRotaryEmbedding``
at each token's original (t, h, w) position moved by its total slot shift.
"""

import time

import numpy as np
import pytest
import torch
from test_vlm_families import frame

from infmllm_ros.bench.random_models import build_random_checkpoint
from infmllm_ros.kvcache.rope import rotate_half
from infmllm_ros.models import load_model
from infmllm_ros.runtime.procstat import rss_mib
from infmllm_ros.runtime.session import StreamSession


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = build_random_checkpoint("qwen2.5-vl-tiny", tmp_path_factory.mktemp("qwen"), seed=2)
    return path, load_model(str(path))


def evicting_session(model, capacity=200):
    return StreamSession(
        model,
        capacity=capacity,
        policy="inf_mllm",
        recent=32,
        sinks=4,
        system_prompt="Watch.",
        novelty_threshold=0.0,
        familiar_interval_s=0.0,
        vision_budget=16,
    )


def test_re_rotated_keys_equal_keys_rotated_fresh_at_their_new_positions(qwen, monkeypatch):
    """After compactions, each kept key is its raw key rotated (by transformers' M-RoPE) to the
    documented position: a text token at its slot, an image token at its slot minus its index in
    the image, h and w moved with t (kvcache/cache.py)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    path, model = qwen
    s = evicting_session(model)
    cache, dec = s.cache, model.decoder
    raw, written, index = [], [], []  # per stream token: pre-RoPE key [kv, d], (t, h, w), index in its image
    begin, forward = cache.begin_chunk, dec.forward
    starts = []

    def record_begin(*args, **kw):
        starts.append(begin(*args, **kw))
        return starts[-1]

    def record_forward(embeds, c, kind, frame_id, stamp_s, mrope=None, deepstack=None):
        out = forward(embeds, c, kind, frame_id, stamp_s, mrope, deepstack)
        rel = torch.arange(embeds.shape[0]).expand(3, -1) if mrope is None else mrope
        written.append(starts[-1][0] + rel)  # the positions this chunk was written at
        t = rel[0].tolist()
        index.extend(k - t.index(t[k]) for k in range(len(t)))  # 0 for text, index within the image
        return out

    attn = dec.model.layers[0].self_attn
    fused = attn.k_proj is None  # packed CPU linears: q/k/v in one product (cpu_gemm.fuse_projections)
    hook = (attn.qkv_proj if fused else attn.k_proj).register_forward_hook(
        lambda mod, inp, out: raw.append(
            (out.split(attn.qkv_widths, dim=-1)[1] if fused else out).reshape(
                out.shape[0], dec.cfg.num_kv_heads, dec.cfg.head_dim
            )
        )
    )
    monkeypatch.setattr(cache, "begin_chunk", record_begin)
    monkeypatch.setattr(dec, "forward", record_forward)
    try:
        s.reset()
        compactions = 0
        for i in range(60):  # stop right after the third compaction: every kept token was moved
            compactions += s.ingest_frame(frame(i, 84 + 28 * (i % 3), 112), float(i)).evicted_tokens > 0
            if compactions == 3:
                break
    finally:
        hook.remove()
    assert compactions == 3 and cache.position_offset == 0
    raw, written, index = torch.cat(raw), torch.cat(written, 1), torch.tensor(index)
    rotary = Qwen2_5_VLRotaryEmbedding(AutoConfig.from_pretrained(str(path)).text_config)
    worst = 0.0
    for h in range(dec.cfg.num_kv_heads):
        token = cache.position[0, h, : cache.length]  # stream index of each kept slot
        t_new = torch.arange(cache.length) - index[token]
        pos = written[:, token] + (t_new - written[0, token])
        cos, sin = rotary(raw, pos[:, None])
        want = raw[token, h] * cos[0] + rotate_half(raw[token, h]) * sin[0]
        worst = max(worst, (cache.k[0, h, : cache.length] - want).abs().max().item())
    assert worst <= 1e-5


@pytest.fixture(scope="module", params=["qwen2.5-vl-tiny", "qwen3-vl-tiny", "internvl3-tiny"])
def evicting_family(request, tmp_path_factory):
    """Each family with vision tokens that M-RoPE, DeepStack or a projector could carry wrong over hours."""
    return load_model(str(build_random_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=2)))


def test_an_hour_of_frames_keeps_memory_and_per_frame_cost_flat(evicting_family):
    """1000 frames (an hour at one stored frame per 3.6 s) through a 256-slot cache."""
    model = evicting_family
    s = evicting_session(model, capacity=256)
    ptr = s.cache.k.data_ptr()
    times, rss = [], {}
    for i in range(1000):
        t0 = time.perf_counter()
        s.ingest_frame(frame(i % 50, 112, 112), 3.6 * i)
        times.append(time.perf_counter() - t0)
        if i in (199, 999):
            rss[i] = rss_mib()
        assert s.cache.length <= s.cache.capacity + s.cache.slack and -s.cache.capacity < s.cache.position_offset <= 0
    assert s.cache.stream_tokens > 1000 * 16  # every frame stored with its vision tokens
    assert s.cache.k.data_ptr() == ptr and s.cache.evicted_tokens > 100 * 256
    early, late = np.median(times[100:300]), np.median(times[800:])
    assert late < 1.5 * early, (early, late)
    assert rss[999] - rss[199] < 32, rss  # MiB
    assert s.cache.frames()[1][-1] == pytest.approx(3.6 * 999)  # the newest frame is in memory
    answer = s.ask("What did you see?", max_new_tokens=4)  # (its prompt may evict the newest frames
    assert answer.frames_in_context >= 1 and answer.new_tokens >= 1  # of a cache this small)
