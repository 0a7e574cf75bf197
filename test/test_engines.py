"""The exportable decoder step: torch step == cache path, onnxruntime == torch, and the session
gives the same answers on the onnxruntime backend as on torch.

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
from infmllm_ros.runtime.backends import OnnxRuntimeBackend, make_backend

CHUNKS = (8, 3, 1, 8, 8, 1, 8, 8, 5, 1, 1, 8)  # prefill chunks and decode steps; evicts past 40


def compare_stream(decoder, run_step, capacity, max_chunk, chunks, seed=0):
    """Max |diff| per output between ``run_step(embeds, k, v, length, positions)`` and the cache path."""
    cache = decoder.new_cache(capacity, max_chunk, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2))
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


def test_onnxruntime_matches_torch_on_a_tiny_model(tmp_path):
    dec = tiny_decoder()
    path = export_decoder_step(
        dec, tmp_path / "step.onnx", StepIdentity.of("tiny", dec, 48, 8, make_policy("inf_mllm", beta=1e-2))
    )
    worst = compare_stream(dec, OrtDecoderStep(path), 40, 8, CHUNKS)
    assert max(worst.values()) < 1e-4, worst


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


CAPACITY, MAX_CHUNK = 256, 64  # one export of SmolLM2 serves the parity and the session tests


@pytest.fixture(scope="module")
def smollm2_engines(smollm2, tmp_path_factory):
    """(decoder, tokenizer, engine dir holding SmolLM2's step for a 256 + 64 slot inf_mllm cache)."""
    dec, tok = smollm2
    engines = tmp_path_factory.mktemp("engines")
    backend = OnnxRuntimeBackend(dec, engines, "smollm2")
    backend.load_engines(dec.new_cache(CAPACITY, MAX_CHUNK, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2)))
    return dec, tok, engines


def test_onnxruntime_matches_torch_on_the_embedded_model(smollm2_engines):
    """SmolLM2-135M (fp32): prefill chunks, single-token decode, cache fills up to eviction."""
    dec, _, engines = smollm2_engines
    (path,) = engines.glob("*.onnx")
    worst = compare_stream(dec, OrtDecoderStep(path), CAPACITY, MAX_CHUNK, (64, 64, 1, 1, 17, 64, 1, 64, 64, 1, 64))
    assert max(worst.values()) < 1e-3, worst


def test_session_answers_the_same_on_onnxruntime(smollm2_engines):
    """The multimodal sanity photos among road frames: identical answers from both backends."""
    from infmllm_ros.bench.drive import bundled_events, synthetic_road
    from infmllm_ros.models.embedded import EmbeddedVLM
    from infmllm_ros.models.vision import LabelEmbeddingProjector, VisionEncoder, imagenet_names
    from infmllm_ros.runtime.session import StreamSession

    dec, tok, engines = smollm2_engines
    model = EmbeddedVLM(dec, tok, "smollm2", VisionEncoder(), LabelEmbeddingProjector(dec, tok, imagenet_names()))
    photos = [image for image, _ in bundled_events().values()]
    answers = {}
    for name in ("torch", "onnxruntime"):  # tensorrt: test_tensorrt.py (no TensorRT here)
        runner = make_backend(name, dec, engines, "smollm2")
        s = StreamSession(
            model,
            capacity=CAPACITY,
            max_chunk=MAX_CHUNK,
            recent=64,
            beta=1e-2,
            backend=runner,  # the fixture's engine (beta is baked into the graph)
            slack=0,  # and its buffer: eager eviction, so this short stream evicts
            familiar_interval_s=0.0,
        )  # every road frame stored: the cache must evict
        texts = []
        for i, photo in enumerate(photos):
            s.ingest_frame(synthetic_road(2 * i), float(2 * i))
            s.ingest_frame(photo, 2.0 * i + 1)
            texts.append(s.ask("What did you see?", max_new_tokens=16, keep_in_context=False).text)
        answers[name] = texts
        assert s.cache.evicted_tokens > 0  # the full-cache regime
    assert answers["onnxruntime"] == answers["torch"]


def test_a_stale_or_corrupt_step_is_set_aside_intact_and_exported_again(smollm2_engines, tmp_path):
    dec, _, engines = smollm2_engines
    (path,) = engines.glob("*.onnx")
    h2o = StepIdentity.of("smollm2", dec, CAPACITY + 64 + MAX_CHUNK, MAX_CHUNK, make_policy("h2o"))
    with pytest.raises(
        ValueError,
        match="infmllm.slots: engine 320, wanted 384; infmllm.beta: engine 0.01, "
        "wanted 0.0; infmllm.normalise: engine True, wanted False",
    ):
        OrtDecoderStep(path).check(h2o)
    tiny = tiny_decoder()
    lines = []
    backend = OnnxRuntimeBackend(tiny, tmp_path, "tiny", progress=lines.append)
    cache = tiny.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2))
    want = backend.engine_path(StepIdentity.for_cache("tiny", tiny, cache))
    for stale, reason in ((path.read_bytes(), "other-identity"), (b"\x08\x07 cut short", "unloadable")):
        want.write_bytes(stale)  # under the right name: a step of another model, then a broken file
        backend.load_engines(cache)
        (aside,) = tmp_path.glob(f"{want.name}.refused-{reason}-*")
        assert aside.read_bytes() == stale and f"set aside as {aside}" in " ".join(lines)
        aside.unlink()
        OrtDecoderStep(want).check(StepIdentity.for_cache("tiny", tiny, cache))  # the fresh export serves
    assert sorted(p.name for p in tmp_path.iterdir()) == [want.name]  # no temporary file left
    with pytest.raises(ValueError, match="outside 1..max_chunk=8"):  # a chunk longer than the profile
        cache.begin_chunk(9)


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
