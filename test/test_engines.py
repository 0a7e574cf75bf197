"""The exportable decoder step: torch step == cache path, onnxruntime == torch on a tiny model,
a stale or cut-short step set aside and exported again, the step's identity, and onnxruntime's
thread count. SmolLM2-135M on onnxruntime: ``test_engine_families.py``.

A stream of prefill chunks and single-token decodes runs through the cache path (Decoder +
KVCache, evicting); before each chunk the step gets the same buffers and length. Everything
the engine must return is compared: last-position logits, the chunk's K/V, the window scores.
"""

import pytest
import torch
from test_cache import tiny_decoder

from infmllm_ros.engines.decoder_step import DecoderStep
from infmllm_ros.engines.identity import StepIdentity
from infmllm_ros.engines.onnx_export import OrtDecoderStep, export_decoder_step
from infmllm_ros.kvcache import make_policy

CHUNKS = (8, 3, 1, 8, 8, 1, 8, 8, 5, 1, 1, 8)  # prefill chunks and decode steps; evicts past 40


def compare_stream(decoder, run_step, capacity, max_chunk, chunks, seed=0, beta=1e-2):
    """Max |diff| per output between ``run_step(embeds, k, v, length, positions)`` and the cache path
    (an ``inf_mllm`` cache of ``beta``, the step's)."""
    cache = decoder.new_cache(capacity, max_chunk, make_policy("inf_mllm", sinks=4, recent=8, beta=beta))
    g = torch.Generator().manual_seed(seed)
    worst = {"logits": 0.0, "new_k": 0.0, "new_v": 0.0, "scores": 0.0}
    evicted = 0
    for n in chunks:
        embeds = decoder.embed(torch.randint(0, decoder.cfg.vocab_size, (n,), generator=g))
        s, before = cache.length, cache.evicted_tokens
        positions = torch.arange(s, s + n).expand(3, n).contiguous()
        logits, new_k, new_v, scores = run_step(embeds[None], cache.k.clone(), cache.v.clone(), s, positions)
        want_logits = decoder.logits(decoder(embeds, cache)[-1:])  # may evict after the chunk
        want_scores = cache._window[:, :, : s + n]  # this chunk's window scores (set before eviction)
        pairs = {"logits": (logits, want_logits), "scores": (scores[..., : s + n], want_scores)}
        if cache.evicted_tokens == before:  # the chunk's K/V still sit where it was written
            pairs.update(new_k=(new_k, cache.k[:, :, s : s + n]), new_v=(new_v, cache.v[:, :, s : s + n]))
        else:
            evicted += 1
        for name, (a, b) in pairs.items():
            worst[name] = max(worst[name], float((a.float() - b.float()).abs().max()))
        assert float(scores[..., s + n :].abs().sum()) == 0.0  # slots beyond the chunk unscored
    assert evicted, "the stream should have evicted"
    return worst


@pytest.mark.parametrize("one_token", [False, True], ids=["export layout", "one-token layout, per-layer buffers"])
def test_step_matches_the_cache_path(one_token):
    """The one-token layout (keys by reduction, each layer's buffer its own input: the compiled
    backend's) computes the same as the exported one, for chunks too."""
    dec = tiny_decoder()
    step = DecoderStep(dec, beta=1e-2, one_token=one_token)
    split = (lambda buf: buf.unbind(0)) if one_token else (lambda buf: buf)
    with torch.no_grad():
        worst = compare_stream(
            dec, lambda e, k, v, s, p: step(e, split(k), split(v), torch.tensor([s]), p), 40, 8, CHUNKS
        )
    assert max(worst.values()) < 1e-5, worst


@pytest.fixture(scope="module")
def tiny_step(tmp_path_factory):
    """(tiny decoder, step identity, its exported step) for a 40 + 8 slot inf_mllm cache: one
    export serves the module."""
    dec = tiny_decoder()
    ident = StepIdentity.of("tiny", dec, 48, 8, make_policy("inf_mllm", beta=1e-2))
    return dec, ident, export_decoder_step(dec, tmp_path_factory.mktemp("tiny-step") / "step.onnx", ident)


def test_onnxruntime_matches_torch_on_a_tiny_model(tiny_step):
    dec, _, path = tiny_step
    worst = compare_stream(dec, OrtDecoderStep(path), 40, 8, CHUNKS)
    assert max(worst.values()) < 1e-4, worst


def test_the_export_leaves_out_only_onnxscripts_slice_pair_rule_and_writes_the_same_graph(
    tiny_step, tmp_path, monkeypatch
):
    """The exporter's optimizer without ``SlicesSplit`` (half of SmolLM2's export time, and it
    rewrites nothing here): every other rule kept, the rule set restored after, the same bytes."""
    import contextlib

    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    from infmllm_ros.engines import onnx_export

    rules = rewriter._DEFAULT_REWRITE_RULES
    with onnx_export._without_slices_split():
        inside = rewriter._DEFAULT_REWRITE_RULES
    assert (
        slice_split_rule in rules and set(rules) - set(inside) == {slice_split_rule} and len(inside) == len(rules) - 1
    )
    assert rewriter._DEFAULT_REWRITE_RULES is rules
    dec, ident, without = tiny_step  # exported without the rule
    monkeypatch.setattr(onnx_export, "_without_slices_split", contextlib.nullcontext)
    assert export_decoder_step(dec, tmp_path / "full.onnx", ident).read_bytes() == without.read_bytes()


def test_onnxruntime_runs_on_torchs_threads_unless_told_otherwise(tiny_step):
    _, _, path = tiny_step
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert OrtDecoderStep(path).session.get_session_options().intra_op_num_threads == threads
        assert OrtDecoderStep(path, threads=3).session.get_session_options().intra_op_num_threads == 3
    finally:
        torch.set_num_threads(before)


def test_torch_backend_without_logits_streams_the_same_cache():
    from infmllm_ros.runtime.backends import TorchBackend

    dec = tiny_decoder()
    backend = TorchBackend(dec)
    caches = [dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8)) for _ in range(2)]
    for i, n in enumerate(CHUNKS):
        embeds = dec.embed(torch.arange(i, i + n) % dec.cfg.vocab_size)
        assert backend.run_chunk(embeds, caches[0]).shape == (dec.cfg.vocab_size,)
        assert backend.run_chunk(embeds, caches[1], logits=False) is None  # a frame: no LM head
    assert caches[0].evicted_tokens > 0 and torch.equal(caches[0].k, caches[1].k)


def test_a_step_identity_follows_the_policy_rule_and_names_the_file():
    dec = tiny_decoder()
    ident = StepIdentity.of("m", dec, 48, 8, make_policy("inf_mllm", beta=0.125))
    assert (ident.beta, ident.normalise, ident.slots, ident.max_chunk, ident.dtype) == (0.125, True, 48, 8, "float32")
    assert ident.stem() == "m.float32.slots48.chunk8.beta0.125.norm"
    assert ident.metadata()["infmllm.beta"] == "0.125" and ident.fields()["layers"] == str(dec.cfg.num_layers)
    assert StepIdentity.of("m", dec, 48, 8, make_policy("h2o")).stem().endswith(".beta0.sum")
    # policies without scores share one step (its scores go unread)
    assert StepIdentity.of("m", dec, 48, 8, make_policy("window")) == StepIdentity.of(
        "m", dec, 48, 8, make_policy("streaming_llm", beta=0.5)
    )

    class Unfused(type(make_policy("h2o"))):
        fused_rule = None

    with pytest.raises(ValueError, match="has no engine graph"):
        StepIdentity.of("m", dec, 48, 8, Unfused(4, 8))


def test_missing_corrupt_or_foreign_onnx_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        OrtDecoderStep(tmp_path / "absent.onnx")
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(RuntimeError, match="corrupt.onnx"):
        OrtDecoderStep(bad)
    other = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), str(other), dynamo=True)
    with pytest.raises(RuntimeError, match="not a step engine"):
        OrtDecoderStep(other)


def test_export_rejects_a_chunk_larger_than_the_buffer(tmp_path):
    with pytest.raises(ValueError, match="max_chunk 64 must be in 1..slots"):
        export_decoder_step(
            tiny_decoder(),
            tmp_path / "x.onnx",
            StepIdentity.of("tiny", tiny_decoder(), 48, 64, make_policy("streaming_llm")),
        )


def test_cache_refuses_engine_outputs_that_do_not_fit_the_chunk():
    dec = tiny_decoder()
    cache = dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8))
    cache.begin_chunk(4)
    k = torch.zeros(3, 2, 4, 16)
    with pytest.raises(ValueError, match="do not fit the pending chunk"):
        cache.store_chunk(k[:, :, :3], k, torch.zeros(3, 2, 48))  # K of 3 tokens for a 4-token chunk
    with pytest.raises(ValueError, match="scores >= 4 slots"):
        cache.store_chunk(k, k, torch.zeros(3, 2, 2))
    for bad_k, bad_v, bad_scores in (
        (k, k[:, :, :3], torch.zeros(3, 2, 48)),
        (k, k, torch.zeros(3, 1, 48)),
        (k, k, torch.zeros(2, 2, 48)),
        (k[:1], k, torch.zeros(3, 2, 48)),
    ):
        with pytest.raises(ValueError, match="do not fit the pending chunk"):
            cache.store_chunk(bad_k, bad_v, bad_scores)
    cache.store_chunk(k, k, torch.zeros(3, 2, 4))  # scores of exactly the occupied slots fit
    cache.rollback()
    assert cache.length == 0 and cache.pending == 0


def test_an_engine_backend_stores_the_same_cache_as_the_torch_path():
    """The engine path (the step's outputs written back by ``store_chunk``) through evictions,
    with the torch step standing in for onnxruntime/TensorRT: same K, V, scores and counters."""
    from infmllm_ros.engines.decoder_step import DecoderStep
    from infmllm_ros.runtime.backends import EngineBackend, TorchBackend

    class TorchStepBackend(EngineBackend):
        name = "torch-step"

        def load_engines(self, cache):
            step = DecoderStep(self.decoder, *cache.policy.fused_rule)
            self.step = lambda e, k, v, length, positions: step(e, k, v, torch.tensor([length]), positions)

    dec = tiny_decoder()
    caches = [dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2)) for _ in range(2)]
    backends = (TorchBackend(dec), TorchStepBackend(dec))
    backends[1].load_engines(caches[1])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in CHUNKS:
            embeds = dec.embed(torch.randint(0, dec.cfg.vocab_size, (n,), generator=g))
            logits = [b.run_chunk(embeds, c) for b, c in zip(backends, caches)]
            torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
            want, got = caches
            assert (got.length, got.evicted_tokens, got.stream_tokens) == (
                want.length,
                want.evicted_tokens,
                want.stream_tokens,
            )
            t = want.length
            for name in ("k", "v", "scores", "position"):
                torch.testing.assert_close(
                    getattr(got, name)[:, :, :t], getattr(want, name)[:, :, :t], atol=1e-4, rtol=1e-4, msg=name
                )
    assert caches[1].evicted_tokens > 0
