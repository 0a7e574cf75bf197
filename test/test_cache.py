"""The fixed-size KV cache on a tiny random LLaMA: memory bound, policies, errors, state safety."""

import pytest
import torch
from conftest import tiny_hf_model

from infmllm_ros.kvcache import POLICIES, CacheFullError, KVCache, SlotKind, make_policy
from infmllm_ros.kvcache.policies import PolicySettingError
from infmllm_ros.models import Decoder, DecoderConfig


def tiny_decoder() -> Decoder:
    """Our decoder carrying the weights of :func:`tiny_hf_model`."""
    hf = tiny_hf_model()
    c = hf.config
    dec = Decoder(
        DecoderConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            rope_theta=1e4,
            rms_norm_eps=c.rms_norm_eps,
            max_position_embeddings=512,
        )
    )
    dec.load_state_dict(hf.state_dict())
    return dec


def stream_logits(dec, cache, ids, chunk):
    return torch.cat([dec.logits(dec(dec.embed(ids[s : s + chunk]), cache)) for s in range(0, len(ids), chunk)])


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_equals_full_when_nothing_is_evicted(tiny, name):
    ids = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(0))
    full = stream_logits(tiny, tiny.new_cache(128, 16, make_policy("full")), ids, 16)
    got = stream_logits(tiny, tiny.new_cache(128, 16, make_policy(name, sinks=4, recent=16)), ids, 16)
    assert torch.equal(got, full)


@pytest.mark.parametrize("name", ["window", "streaming_llm", "h2o", "inf_mllm"])
def test_memory_is_fixed_and_length_stays_at_capacity(tiny, name):
    cache = tiny.new_cache(48, 8, make_policy(name, sinks=4, recent=8))
    ptr, shape = cache.k.data_ptr(), tuple(cache.k.shape)
    ids = torch.randint(0, 97, (400,), generator=torch.Generator().manual_seed(1))
    stream_logits(tiny, cache, ids, 8)
    assert cache.k.data_ptr() == ptr and tuple(cache.k.shape) == shape == (3, 2, 56, 16)
    assert cache.length == 48 and cache.stream_tokens == 400 and cache.evicted_tokens == 352
    pos = cache.position[:, :, :48]
    assert bool((pos[..., 1:] > pos[..., :-1]).all()), "kept tokens must stay in temporal order"
    if name != "window":
        assert pos[..., :4].tolist() == [[[0, 1, 2, 3]] * 2] * 3, "sinks must survive"
    assert bool((pos[..., -8:] == torch.arange(392, 400)).all()), "recent tokens must survive"


def test_h2o_and_inf_mllm_keep_different_tokens_per_row(tiny):
    cache = tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=2, recent=8, beta=0.0, decay=0.0))
    stream_logits(tiny, cache, torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(2)), 8)
    rows = cache.position[:, :, :40].reshape(-1, 40)
    assert len({tuple(r.tolist()) for r in rows}) > 1


def test_slot_metadata_follows_tokens(tiny):
    cache = tiny.new_cache(40, 8, make_policy("streaming_llm", sinks=4))
    tiny(tiny.embed(torch.arange(8)), cache, SlotKind.SINK)
    for f in range(8):
        tiny(tiny.embed(torch.arange(8)), cache, SlotKind.VISION, frame_id=f, stamp_s=10.0 + f)
    # 72 tokens streamed into 40 slots: sinks (4) + the newest 36 = frames 4..7 and half of 3.
    frames = cache.frame[0, 0, :40]
    assert cache.kind[0, 0, :4].tolist() == [SlotKind.SINK] * 4
    assert frames[4:].tolist() == [3] * 4 + [4] * 8 + [5] * 8 + [6] * 8 + [7] * 8
    assert cache.stamp[0, 0, 39].item() == 17.0


def test_bad_sizes_and_names_are_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"capacity 40 is smaller than sinks \(4\) \+ recent \(32\) \+ chunk \(8\)"):
        tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=32))
    with pytest.raises(ValueError, match="unknown KV-cache policy 'lru'.*inf_mllm"):
        make_policy("lru")
    with pytest.raises(ValueError, match="trained context"):
        tiny.new_cache(500, 32, make_policy("window", sinks=0, recent=8))
    with pytest.raises(ValueError, match="beta"):
        make_policy("inf_mllm", beta=-1.0)


def test_rejected_chunks_leave_the_cache_unchanged(tiny):
    cache = tiny.new_cache(32, 8, make_policy("full"))
    stream_logits(tiny, cache, torch.arange(32), 8)
    k_before = cache.k.clone()
    with pytest.raises(CacheFullError, match="cannot take 8 more"):
        tiny(tiny.embed(torch.arange(8)), cache)
    with pytest.raises(ValueError, match="outside 1..max_chunk=8"):
        tiny(tiny.embed(torch.arange(9)), cache)
    with pytest.raises(ValueError, match=r"embeds must be \[n, 64\]"):
        tiny(torch.zeros(3, 5), cache)
    assert cache.length == 32 and cache.pending == 0 and torch.equal(cache.k, k_before)


def test_kvcache_validates_shape_arguments():
    with pytest.raises(ValueError, match="max_chunk"):
        KVCache(layers=1, kv_heads=1, head_dim=4, capacity=8, max_chunk=0, policy=make_policy("full"), rope=None)


def test_size_and_count_limits_are_exact():
    """Each limit refuses exactly below its bound and accepts the bound itself."""
    full = make_policy("full")
    for kw in (dict(layers=0), dict(kv_heads=0), dict(head_dim=0), dict(capacity=0)):
        with pytest.raises(ValueError):
            KVCache(**{**dict(layers=1, kv_heads=1, head_dim=4, capacity=8, max_chunk=1, policy=full, rope=None), **kw})
    smallest = KVCache(layers=1, kv_heads=1, head_dim=1, capacity=1, max_chunk=1, policy=full, rope=None)
    assert tuple(smallest.k.shape) == (1, 1, 2, 1) and smallest.kind.dtype == torch.int8
    assert smallest.frame.dtype == torch.int32 and smallest.stamp.dtype == torch.float64
    for kw in (dict(sinks=-1), dict(recent=-1), dict(vision_budget=-1)):
        with pytest.raises(PolicySettingError, match="must be >= 0") as err:
            make_policy("h2o", **kw)
        assert err.value.setting == next(iter(kw))  # the setting a caller reports under its own name
    make_policy("h2o", sinks=0, recent=0, vision_budget=0)
    make_policy("inf_mllm", beta=0.0, decay=0.0), make_policy("inf_mllm", decay=1.0)
    for bad in (dict(decay=-0.01), dict(decay=1.01), dict(beta=float("inf")), dict(beta=-1e-9)):
        for name in ("inf_mllm", "streaming_llm"):  # checked whatever the policy: one rule for every caller
            with pytest.raises(PolicySettingError) as err:
                make_policy(name, **bad)
            assert err.value.setting == next(iter(bad))
    for kw, setting in (
        (dict(capacity=0), "capacity"),
        (dict(max_chunk=0), "max_chunk"),
        (dict(slack=-1), "slack"),
        (dict(capacity=11), "capacity"),
        (dict(capacity=4), "recent"),
    ):
        with pytest.raises(PolicySettingError) as err:
            KVCache.check_settings(
                **{**dict(capacity=12, max_chunk=4, slack=0, policy=make_policy("h2o", sinks=4, recent=4)), **kw}
            )
        assert err.value.setting == setting
    KVCache.check_settings(12, 4, 0, make_policy("h2o", sinks=4, recent=4))


def test_frames_lists_every_frame_held_by_any_row_with_its_stamp(tiny):
    """Rows keep different tokens (h2o), so a frame counts while any row holds one of its slots."""
    cache = tiny.new_cache(24, 4, make_policy("h2o", sinks=2, recent=4))
    assert cache.frames() == ([], [])
    tiny(tiny.embed(torch.arange(2)), cache, SlotKind.SINK)
    for f in range(12):
        tiny(tiny.embed(torch.tensor([1, 10 + f, 11 + f, 3])), cache, SlotKind.VISION, frame_id=f, stamp_s=100.0 + f)
    ids, stamps = cache.frames()
    held = cache.frame[:, :, : cache.length]
    want = sorted({int(x) for x in held[held >= 0]})
    assert ids == want and stamps == [100.0 + f for f in want] and ids[-1] == 11 and 0 < len(ids) < 12


def test_reserve_top_lifts_the_best_eligible_slots_of_each_row():
    from infmllm_ros.kvcache.policies import RESERVED_SCORE, reserve_top

    scores = torch.tensor([[0.9, 0.1, 0.3, 0.2, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    eligible = torch.tensor([[False, True, True, True, False], [False, False, False, False, True]])
    out = reserve_top(scores, eligible, 2)
    assert out[0].tolist() == pytest.approx([0.9, 0.1, RESERVED_SCORE, RESERVED_SCORE, 0.5])
    # a row with one eligible slot reserves only that one; the other scores are untouched
    assert out[1].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, RESERVED_SCORE])


def frame_survival(tiny, vision_budget):
    """Share of rows still holding frame 0's vision tokens after 300 tokens of text pressure."""
    pol = make_policy("inf_mllm", sinks=4, recent=8, beta=0.05, decay=0.9, vision_budget=vision_budget)
    cache = tiny.new_cache(40, 8, pol)
    tiny(tiny.embed(torch.arange(4)), cache, SlotKind.SINK)
    tiny(tiny.embed(torch.arange(90, 94)), cache, SlotKind.VISION, frame_id=0, stamp_s=1.0)
    stream_logits(tiny, cache, torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(3)), 8)
    vis = (cache.frame[:, :, : cache.length] == 0) & (cache.kind[:, :, : cache.length] == SlotKind.VISION)
    return vis.sum(-1)


def test_a_vision_budget_keeps_a_frames_vision_tokens_that_saddles_alone_evict(tiny):
    assert int(frame_survival(tiny, 0).max()) < 4, "without a budget the frame must be (partly) evicted"
    assert frame_survival(tiny, 4).tolist() == [[4, 4]] * 3, "a budget of 4 keeps all 4 vision tokens in every row"


def test_vision_budget_errors_are_clear(tiny):
    with pytest.raises(ValueError, match="streaming_llm does not score slots"):
        make_policy("streaming_llm", vision_budget=8)
    with pytest.raises(ValueError, match="vision_budget 40 does not fit"):
        tiny.new_cache(48, 8, make_policy("h2o", sinks=4, recent=8, vision_budget=40))
    with pytest.raises(ValueError, match="vision_budget must be >= 0"):
        make_policy("inf_mllm", vision_budget=-1)


def occupied(cache: KVCache) -> tuple:
    """Every state tensor's occupied part (cloned) and the counters."""
    n = cache.length
    return (
        [t[:, :, :n].clone() for t in cache._state()],
        (cache.length, cache.stream_tokens, cache.evicted_tokens, cache.position_offset),
    )


def assert_same(before: tuple, cache: KVCache) -> None:
    after = occupied(cache)
    assert after[1] == before[1]
    for a, b in zip(after[0], before[0]):  # bit-identical; stamps of text slots are NaN on both sides
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


@pytest.mark.parametrize("name", ["h2o", "inf_mllm"])
def test_restoring_a_snapshot_undoes_chunks_that_evicted(tiny, name):
    """The state a question asked with keep_in_context=False must leave: bit-identical tensors,
    scores and counters, even though the question's chunks evicted and compacted."""
    cache = tiny.new_cache(64, 16, make_policy(name, sinks=4, recent=16))
    ids = torch.randint(0, 97, (90,), generator=torch.Generator().manual_seed(1))
    stream_logits(tiny, cache, ids[:60], 16)  # nearly full
    before, snap = occupied(cache), cache.snapshot()
    evicted = cache.evicted_tokens
    stream_logits(tiny, cache, ids[60:], 16)  # the "question": evicts
    assert cache.evicted_tokens > evicted
    cache.restore(snap)
    assert_same(before, cache)


def test_a_failure_half_way_through_the_layers_leaves_the_cache_as_it_was(tiny, monkeypatch):
    """Layer 2 raises mid-chunk: the cache is bit-identical to before the chunk, and the next
    chunk gives the same logits as a cache that never saw the failed one."""
    ids = torch.randint(0, 97, (48,), generator=torch.Generator().manual_seed(2))
    cache = tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8))
    clean = tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8))
    stream_logits(tiny, cache, ids[:40], 8)  # full: the failed chunk would have evicted
    stream_logits(tiny, clean, ids[:40], 8)
    before = occupied(cache)
    layer = tiny.model.layers[2]

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure in layer 2")

    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        tiny(tiny.embed(ids[40:48]), cache)
    monkeypatch.undo()
    assert_same(before, cache) and cache.pending == 0
    assert torch.equal(stream_logits(tiny, cache, ids[40:48], 8), stream_logits(tiny, clean, ids[40:48], 8))


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "inf_mllm"])
def test_kept_keys_equal_their_raw_keys_rotated_fresh_at_their_new_slots(tiny, name):
    """After evictions, every kept key in every layer is its layer's pre-RoPE key (recorded from
    k_proj) rotated by transformers' LlamaRotaryEmbedding at its new slot: re-rotation checked
    against an implementation that is not the cache's."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from infmllm_ros.kvcache.rope import rotate_half

    cfg = tiny.cfg
    raw = {i: [] for i in range(cfg.num_layers)}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(
            lambda mod, inp, out, i=i: raw[i].append(out.view(out.shape[0], cfg.num_kv_heads, cfg.head_dim))
        )
        for i, layer in enumerate(tiny.model.layers)
    ]
    cache = tiny.new_cache(48, 8, make_policy(name, sinks=4, recent=8))
    try:
        stream_logits(tiny, cache, torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(3)), 8)
    finally:
        for h in hooks:
            h.remove()
    assert cache.evicted_tokens > 60
    rotary = LlamaRotaryEmbedding(
        LlamaConfig(
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_heads,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=512,
        )
    )
    slots = torch.arange(cache.length)
    for layer in range(cfg.num_layers):
        keys = torch.cat(raw[layer])  # [stream tokens, kv_heads, head_dim]
        for h in range(cfg.num_kv_heads):
            token = cache.position[layer, h, : cache.length]
            assert bool((token > slots).any())  # tokens did move
            cos, sin = rotary(keys, slots[None])
            want = keys[token, h] * cos[0] + rotate_half(keys[token, h]) * sin[0]
            assert (cache.k[layer, h, : cache.length] - want).abs().max().item() <= 1e-5


def test_after_streaming_llm_evictions_the_next_chunk_equals_transformers_over_the_kept_cache(tiny):
    """StreamingLLM equivalence: after evictions leave sinks + recent window, the next chunk's
    logits equal transformers' own forward of that chunk over a DynamicCache holding exactly the
    kept keys and values at their new slots (positions continue from the kept length). (A fresh
    forward over the kept token ids is not the reference: their deeper-layer values were computed
    with the evicted tokens in context, as StreamingLLM's are.)"""
    from transformers import DynamicCache

    hf = tiny_hf_model()
    ids = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(4))
    cache = tiny.new_cache(48, 8, make_policy("streaming_llm", sinks=4, recent=8))
    stream_logits(tiny, cache, ids[:192], 8)
    n = cache.length
    kept = cache.position[0, 0, :n]
    assert cache.evicted_tokens == 144 and bool((cache.position[:, :, :n] == kept).all())
    assert kept[:4].tolist() == [0, 1, 2, 3] and kept[-1].item() == 191
    past = DynamicCache()
    for layer in range(tiny.cfg.num_layers):
        past.update(cache.k[layer, :, :n][None].clone(), cache.v[layer, :, :n][None].clone(), layer)
    with torch.no_grad():
        want = hf(ids[192:][None], past_key_values=past, position_ids=torch.arange(n, n + 8)[None]).logits[0]
    got = stream_logits(tiny, cache, ids[192:], 8)
    assert (got - want).abs().max().item() <= 1e-4


class IndependentScores:
    """Per-row kept tokens and scores of h2o / inf_mllm, recomputed from each chunk's queries
    and keys with a plain float64 softmax, by stream position, without the cache's scoring,
    selection or compaction code: the window score of key ``j`` is the softmax of
    ``q.k * scale + beta * j`` (causal) summed over the chunk's queries that see ``j`` (divided by
    their count for inf_mllm), averaged over the query heads of the KV head; carried as
    ``decay * old + window``; on overflow a row keeps its sinks, its newest ``recent`` and the
    best-scoring others (the best ``vision_budget`` VISION tokens first), ties to the older.
    Lazy eviction: a row evicts only once it holds more than ``capacity + slack`` tokens."""

    def __init__(self, cache, beta, normalise, decay, sinks, recent, vision_budget, slack=0):
        self.cache, self.beta, self.normalise, self.decay, self.slack = cache, beta, normalise, decay, slack
        self.sinks, self.recent, self.vision_budget = sinks, recent, vision_budget
        layers, heads = cache.rows
        self.rows = [
            [{"tok": [], "kind": [], "score": torch.zeros(0, dtype=torch.float64)} for _ in range(heads)]
            for _ in range(layers)
        ]
        self.seen = {}
        self.evictions = 0
        attend, commit = cache.attend, cache.commit

        def recording_attend(layer, q, k, v):
            out = attend(layer, q, k, v)
            t = cache.length + cache.pending
            self.seen[layer] = (q.detach().double(), cache.k[layer, :, :t].detach().double().clone())
            return out

        def checked_commit():
            self.step()
            evicted = commit()
            self.check()
            return evicted

        cache.attend, cache.commit = recording_attend, checked_commit

    def step(self):
        cache = self.cache
        s, n = cache.length, cache.pending
        t = s + n
        new_tok = list(range(cache.stream_tokens, cache.stream_tokens + n))
        new_kind = cache.kind[0, 0, s:t].tolist()
        slot = torch.arange(t, dtype=torch.float64)
        hidden = slot[None, :] > (s + torch.arange(n))[:, None]  # [n, t]: query i cannot see key j
        viewers = (~hidden).sum(0).clamp(min=1).double()
        for layer, heads in enumerate(self.rows):
            q, keys = self.seen.pop(layer)
            group = q.shape[0] // keys.shape[0]
            for h, row in enumerate(heads):
                logits = q[h * group : (h + 1) * group] @ keys[h].T * cache.scale + self.beta * slot
                probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
                window = probs.sum(1) / (viewers if self.normalise else 1.0)
                window = window.mean(0)
                row["score"] = torch.cat((self.decay * row["score"] + window[:s], window[s:]))
                row["tok"] += new_tok
                row["kind"] += new_kind
                if t > cache.capacity + self.slack:
                    self.evict(row, t)
        self.evictions += t > cache.capacity + self.slack

    def evict(self, row, t):
        middle = range(self.sinks, t - self.recent)
        best = sorted(middle, key=lambda j: (-row["score"][j].item(), j))
        vision = [j for j in best if row["kind"][j] == SlotKind.VISION][: self.vision_budget]
        others = [j for j in best if j not in vision]
        keep = sorted(
            [
                *range(self.sinks),
                *vision,
                *others[: self.cache.capacity - self.sinks - self.recent - len(vision)],
                *range(t - self.recent, t),
            ]
        )
        row["tok"] = [row["tok"][j] for j in keep]
        row["kind"] = [row["kind"][j] for j in keep]
        row["score"] = row["score"][keep]

    def check(self):
        n = self.cache.length
        for layer, heads in enumerate(self.rows):
            for h, row in enumerate(heads):
                assert self.cache.position[layer, h, :n].tolist() == row["tok"], (layer, h)
                torch.testing.assert_close(self.cache.scores[layer, h, :n].double(), row["score"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "name, beta, normalise, decay, vision_budget, slack, chunk",
    [
        ("h2o", 0.0, False, 1.0, 0, 0, 6),
        ("inf_mllm", 0.05, True, 0.9, 0, 0, 6),
        ("inf_mllm", 0.0, True, 0.0, 0, 0, 6),
        ("inf_mllm", 0.05, True, 0.9, 6, 0, 6),
        ("h2o", 0.0, False, 1.0, 0, 0, 1),
        ("inf_mllm", 0.05, True, 0.9, 0, 0, 1),
        ("inf_mllm", 0.05, True, 0.9, 6, 13, 6),
        ("inf_mllm", 0.05, True, 0.9, 0, 3, 1),
    ],
)
def test_h2o_and_inf_mllm_keep_what_an_independent_score_loop_keeps(
    tiny, name, beta, normalise, decay, vision_budget, slack, chunk
):
    """Every commit, every (layer, KV head) row holds exactly the tokens, and carries the scores,
    that :class:`IndependentScores` computes from the same queries and keys: the window score
    (of a chunk, and of a single decoded token, which takes its own path), the bias, the carry
    with decay, the sinks/recent/top-k selection, the vision budget and lazy eviction's slack
    each have to be right for this to hold over a stream with many evictions."""
    kw = dict(beta=beta, decay=decay) if name == "inf_mllm" else {}
    cache = tiny.new_cache(40, 8, make_policy(name, sinks=4, recent=8, vision_budget=vision_budget, **kw), slack=slack)
    ref = IndependentScores(cache, beta, normalise, decay, 4, 8, vision_budget, slack)
    ids = torch.randint(0, 97, (240,), generator=torch.Generator().manual_seed(5))
    tiny(tiny.embed(ids[:4]), cache, SlotKind.SINK)
    for i, start in enumerate(range(4, 240, chunk)):
        kind = SlotKind.VISION if i % 4 == 1 else SlotKind.TEXT  # a "frame" every fourth chunk
        tiny(tiny.embed(ids[start : start + chunk]), cache, kind, frame_id=i if kind == SlotKind.VISION else -1)
    assert ref.evictions >= (30 if slack < 5 else 8)
    kept_vision = (cache.kind[:, :, : cache.length] == SlotKind.VISION).sum(-1)
    if vision_budget:
        assert bool((kept_vision >= vision_budget).all())


@pytest.mark.parametrize("name", ["streaming_llm", "inf_mllm", "window"])
def test_lazy_eviction_runs_at_most_once_per_slack_tokens_and_never_grows_the_buffer(tiny, name):
    """With slack S a cache appends until it holds more than capacity + S tokens, then evicts
    down to exactly its capacity: between two evictions at least S + 1 tokens arrive, the length
    never exceeds capacity + S, and the buffer is the one allocated at the start."""
    slack = 10
    cache = tiny.new_cache(40, 8, make_policy(name, sinks=4, recent=8), slack=slack)
    assert cache.k.shape[2] == 40 + slack + 8
    ptr = cache.k.data_ptr()
    g = torch.Generator().manual_seed(2)
    since, evictions = 0, 0
    for _ in range(120):
        n = int(torch.randint(1, 9, (1,), generator=g))
        before = cache.length
        tiny(tiny.embed(torch.randint(0, 97, (n,), generator=g)), cache)
        since += n
        if cache.length < before + n:  # this chunk evicted
            evictions += 1
            assert cache.length == 40 and since >= slack + 1 and before + n > 40 + slack
            since = 0
        assert cache.length <= 40 + slack
    assert evictions >= 10 and cache.k.data_ptr() == ptr
    assert cache.evicted_tokens == cache.stream_tokens - cache.length


def test_a_full_cache_ignores_slack_and_stops_at_its_capacity(tiny):
    cache = tiny.new_cache(32, 8, make_policy("full"), slack=16)
    assert cache.slack == 0 and cache.k.shape[2] == 40
    for start in range(0, 32, 8):
        tiny(tiny.embed(torch.arange(start, start + 8)), cache)
    with pytest.raises(CacheFullError):
        tiny(tiny.embed(torch.arange(1)), cache)


def test_a_negative_slack_is_refused(tiny):
    with pytest.raises(ValueError, match="slack"):
        tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8), slack=-1)


def mrope_cache(capacity: int = 64, policy: str = "full") -> KVCache:
    """A one-row M-RoPE cache (head_dim 8, sections 1/2/1) without a model."""
    from infmllm_ros.kvcache import Rope

    return KVCache(
        layers=1,
        kv_heads=1,
        head_dim=8,
        capacity=capacity,
        max_chunk=16,
        policy=make_policy(policy, sinks=2, recent=4),
        rope=Rope(8, 1e4, mrope_section=(1, 2, 1)),
    )


def image_positions(h: int, w: int) -> torch.Tensor:
    """int64 ``[3, h*w]`` (t, h, w) positions of one image of ``h x w`` tokens (t = 0 for all)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.zeros(h * w, dtype=torch.int64), rows.reshape(-1), cols.reshape(-1)])


def write(cache: KVCache, n: int, mrope: torch.Tensor | None = None) -> torch.Tensor:
    """Begin and commit an n-token chunk (zero K/V); returns its 1-D positions."""
    positions = cache.begin_chunk(n, mrope=mrope)
    cache.commit()
    return positions


def test_mrope_images_move_the_position_counter_by_their_extent_one_after_another():
    """transformers' get_rope_index: after an h x w image the text resumes max(h, w) positions
    later, and each image adds its own extent (the lags add up)."""
    cache = mrope_cache()
    assert write(cache, 3).tolist() == [0, 1, 2]
    write(cache, 12, image_positions(3, 4))  # 12 tokens, extent 4
    write(cache, 4, image_positions(2, 2))  # 4 tokens, extent 2
    assert cache.position_offset == (4 - 12) + (2 - 4)
    assert write(cache, 2).tolist() == [3 + 4 + 2, 3 + 4 + 2 + 1]


def test_restoring_a_snapshot_restores_the_mrope_position_offset():
    cache = mrope_cache()
    write(cache, 3)
    write(cache, 12, image_positions(3, 4))
    snap = cache.snapshot()
    expected = cache.position_offset
    write(cache, 4, image_positions(2, 2))
    assert cache.position_offset != expected
    cache.restore(snap)
    assert cache.position_offset == expected and write(cache, 1).tolist() == [3 + 4]


@pytest.mark.parametrize("slack, evicted", [(0, [0, 0, 0, 4, 4, 4]), (6, [0, 0, 0, 0, 8, 0])])
def test_commit_returns_the_tokens_it_evicted(slack, evicted):
    cache = KVCache(
        layers=1,
        kv_heads=1,
        head_dim=4,
        capacity=12,
        max_chunk=4,
        policy=make_policy("streaming_llm", sinks=2),
        rope=None,
        slack=slack,
    )
    got = []
    for _ in range(6):
        cache.begin_chunk(4)
        got.append(cache.commit())
    assert got == evicted and cache.evicted_tokens == sum(evicted)


def test_the_vision_budget_is_spent_outside_the_recent_slots_that_are_kept_anyway():
    """Slots 2 and 3 are the only VISION slots outside sinks and recent; the recent VISION slots
    score higher but are kept anyway, so the budget of 2 must go to slots 2 and 3."""
    policy = make_policy("h2o", sinks=1, recent=4, vision_budget=2)
    kind = torch.full((1, 1, 12), int(SlotKind.TEXT), dtype=torch.int8)
    kind[..., [2, 3, 8, 9, 10, 11]] = int(SlotKind.VISION)
    scores = torch.tensor([[[9.0, 5, 0.1, 0.2, 4, 3, 2, 1, 8, 8, 8, 8]]])
    keep = policy.select(scores, (1, 1), 12, 8, torch.device("cpu"), kind)
    assert keep[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_which_policies_score_slots_and_what_streaming_llm_protects_at_the_capacity_bound():
    from infmllm_ros.kvcache.policies import scores_slots

    assert [name for name in sorted(POLICIES) if scores_slots(name)] == ["h2o", "inf_mllm"]
    assert not scores_slots("lru")  # unknown: make_policy reports it
    streaming = make_policy("streaming_llm", sinks=4)
    assert streaming.protected(4) == (4, 0) and streaming.protected(3) == (4, 0)  # nothing beyond the sinks
    streaming.check_capacity(4 + 8, 8)  # the sinks and one chunk: the smallest capacity that works
    with pytest.raises(PolicySettingError):
        streaming.check_capacity(4 + 7, 8)


def test_restore_ends_a_chunk_that_was_begun_after_the_snapshot():
    cache = KVCache(layers=1, kv_heads=1, head_dim=4, capacity=12, max_chunk=4, policy=make_policy("full"), rope=None)
    cache.begin_chunk(4)
    cache.commit()
    snap = cache.snapshot()
    cache.begin_chunk(3)  # e.g. a question whose decoding was cut mid-chunk
    cache.restore(snap)
    assert cache.pending == 0 and cache.length == 4
    cache.begin_chunk(2)
    assert cache.commit() == 0 and cache.length == 6


def test_chunks_of_two_tokens_are_causal_like_one_long_chunk(tiny):
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(4))
    whole = stream_logits(tiny, tiny.new_cache(64, 24, make_policy("full")), ids, 24)
    for chunk in (2, 3):
        torch.testing.assert_close(
            stream_logits(tiny, tiny.new_cache(64, 24, make_policy("full")), ids, chunk), whole, atol=1e-5, rtol=1e-5
        )


def test_mrope_re_rotation_after_an_eviction_reaches_every_layer():
    """Two layers given the same keys must still hold the same keys after an eviction that
    re-rotates by the M-RoPE lag (text after an image)."""
    from infmllm_ros.kvcache import Rope

    cache = KVCache(
        layers=2,
        kv_heads=1,
        head_dim=8,
        capacity=16,
        max_chunk=12,
        policy=make_policy("streaming_llm", sinks=2),
        rope=Rope(8, 1e4, mrope_section=(1, 2, 1)),
    )
    g = torch.Generator().manual_seed(5)
    for n, mrope in ((4, None), (12, image_positions(3, 4)), (4, None)):
        cache.begin_chunk(n, mrope=mrope)
        q, k, v = (torch.randn(1, n, 8, generator=g) for _ in range(3))
        for layer in range(2):
            cache.attend(layer, q, k, v)
        evicted = cache.commit()
    assert evicted == 4 and cache.position_offset == 0
    assert torch.equal(cache.k[0], cache.k[1]) and bool(cache.k[1].abs().sum() > 0)


def test_restoring_a_snapshot_restores_the_mrope_lag_of_every_slot():
    cache = mrope_cache()
    write(cache, 3)
    write(cache, 12, image_positions(3, 4))
    write(cache, 2)  # text after the image: lag -8
    snap = cache.snapshot()
    lag = cache.rope_lag[:, :, : cache.length].clone()
    assert bool((lag != 0).any())
    cache.rope_lag.zero_()
    cache.restore(snap)
    assert torch.equal(cache.rope_lag[:, :, : cache.length], lag)


def test_bad_mrope_positions_and_a_second_begin_are_refused_with_the_reason():
    cache, text = (
        mrope_cache(),
        KVCache(layers=1, kv_heads=1, head_dim=8, capacity=64, max_chunk=16, policy=make_policy("full"), rope=None),
    )
    good = image_positions(2, 2)
    for target, mrope in (
        (cache, good[:2]),
        (cache, good - 1),
        (cache, good + 3),  # shape, min < 0, max == n
        (text, good),
    ):
        with pytest.raises(ValueError, match=r"mrope positions must be int \[3, 4\] in 0..3 on an M-RoPE cache"):
            target.begin_chunk(4, mrope=mrope)
    cache.begin_chunk(4, mrope=good)
    with pytest.raises(RuntimeError, match="begin_chunk called twice without commit"):
        cache.begin_chunk(1)
    with pytest.raises(ValueError, match="layers, kv_heads and head_dim must be >= 1"):
        KVCache(layers=1, kv_heads=0, head_dim=8, capacity=8, max_chunk=1, policy=make_policy("full"), rope=None)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        KVCache.check_settings(0, 1, 0, make_policy("full"))


def test_defaults_of_the_policy_and_cache_constructors():
    policy = make_policy("inf_mllm")
    assert (policy.sinks, policy.recent, policy.vision_budget) == (4, 64, 0)
    assert type(policy)(4, 8).vision_budget == 0 and make_policy("window").vision_budget == 0
    assert all(cls(4, 8).vision_budget == 0 for cls in POLICIES.values())  # constructed without a budget
    cache = KVCache(layers=1, kv_heads=1, head_dim=4, capacity=8, max_chunk=2, policy=make_policy("window"), rope=None)
    assert cache.slack == 0 and cache.k.shape[2] == 10


def test_policy_refusals_name_their_setting_and_reason():
    for call, setting, message in (
        (lambda: make_policy("lru"), "policy", r"unknown KV-cache policy 'lru'; choose one of \['full'"),
        (lambda: make_policy("inf_mllm", decay=1.5), "decay", r"decay must be in \[0, 1\], got 1.5"),
        (lambda: make_policy("window", vision_budget=4), "vision_budget", "policy window does not score slots"),
        (
            lambda: make_policy("h2o", sinks=2, recent=4, vision_budget=8).check_capacity(13, 4),
            "vision_budget",
            "vision_budget 8 does not fit beside sinks",
        ),
        (
            lambda: make_policy("h2o", sinks=2, recent=4).check_capacity(9, 4),
            "capacity",
            r"capacity 9 is smaller than sinks \(2\) \+ recent \(4\) \+ chunk \(4\) = 10 tokens",
        ),
    ):
        with pytest.raises(PolicySettingError, match=message) as err:
            call()
        assert err.value.setting == setting
    make_policy("h2o", sinks=2, recent=4, vision_budget=8).check_capacity(14, 4)  # exactly fits
    make_policy("window").check_capacity(8, 8)  # a window keeps nothing beyond the chunk
    with pytest.raises(ValueError, match="a vision budget needs the slot kinds"):
        make_policy("h2o", sinks=1, recent=1, vision_budget=1).select(torch.zeros(1, 1, 6), (1, 1), 6, 4, "cpu")
