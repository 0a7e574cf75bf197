"""The compiled decode step (``torch.compile`` of the decoder step, ``backend: compiled``): a
stream whose tokens are decoded through it keeps the same cache, slot for slot, and gives the
same logits as the torch path, for every CPU weight form and for an M-RoPE model; it compiles
once per cache and never again as the stream grows and evicts; on CUDA its CUDA graph gives the
eager step's logits.
"""

import pytest
import torch
import torch._dynamo
from test_cache import tiny_decoder
from test_engines import CHUNKS

from infmllm_ros.engines.decoder_step import DecoderStep
from infmllm_ros.kvcache import make_policy
from infmllm_ros.models.cpu_gemm import pack_linears, quantize_linears
from infmllm_ros.runtime.backends import CompiledBackend, TorchBackend, make_backend

WEIGHTS = {"fp32 dense": lambda decoder: None, "fp32 packed": pack_linears, "int8": quantize_linears}
#: Relative and absolute tolerance of the compiled step against the torch path, by weight form.
#: int8: torch's ``_weight_int8pack_mm`` rounds each product to bf16 (its input's dtype, ~0.4% at
#: most); Inductor's int8 kernel, chosen by autotuning, keeps the fp32 product.
TOLERANCE = {"fp32 dense": 1e-5, "fp32 packed": 1e-5, "int8": 2e-2}
QUIET = dict(progress=lambda line: None)


@pytest.fixture
def compile_once():
    """Each test compiles afresh, and a second compile of the step within it is an error."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("weights", WEIGHTS)
def test_tokens_decoded_through_the_compiled_step_keep_the_torch_paths_cache(weights, compile_once):
    dec = tiny_decoder()
    WEIGHTS[weights](dec)
    caches = [dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2), slack=4) for _ in range(2)]
    eager, compiled = TorchBackend(dec), CompiledBackend(dec, **QUIET)
    compiled.load_engines(caches[1])
    g = torch.Generator().manual_seed(5)
    for n in CHUNKS + (1,) * 30:  # prefill chunks (the torch path in both) and single decoded tokens
        embeds = dec.embed(torch.randint(0, dec.cfg.vocab_size, (n,), generator=g))
        want, got = eager.run_chunk(embeds, caches[0]), compiled.run_chunk(embeds, caches[1])
        torch.testing.assert_close(got, want, atol=TOLERANCE[weights], rtol=TOLERANCE[weights])
    want, got = caches
    assert want.evicted_tokens >= 30 and (got.length, got.evicted_tokens) == (want.length, want.evicted_tokens)
    assert torch.equal(got.position, want.position)  # the same tokens kept in every row
    for name in ("k", "v", "scores"):
        torch.testing.assert_close(
            getattr(got, name), getattr(want, name), atol=TOLERANCE[weights], rtol=TOLERANCE[weights], msg=name
        )


def test_two_models_of_one_shape_each_decode_with_their_own_weights(compile_once):
    """The step's graph holds its weights frozen: a second model of the same shape in the same
    process must get its own graph, not the first one's."""
    decoders = [tiny_decoder(), tiny_decoder()]
    with torch.no_grad():
        for p in decoders[1].parameters():
            p.mul_(1.5)
    embeds = decoders[0].embed(torch.tensor([3]))
    with torch._dynamo.config.patch(error_on_recompile=False):  # the second model's graph is a recompile
        for dec in decoders:
            pack_linears(dec)
            cache = dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2))
            want = TorchBackend(dec).run_chunk(
                embeds, dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2))
            )
            backend = CompiledBackend(dec, **QUIET)
            backend.load_engines(cache)
            torch.testing.assert_close(backend.run_chunk(embeds, cache), want, atol=1e-5, rtol=1e-5)


def test_answers_of_an_m_rope_model_are_the_same_through_the_compiled_step(compile_once, tmp_path):
    """Qwen2.5-VL (tiny, random): frames move the text's RoPE position away from its slot; the
    question's answer decodes at that offset through the compiled step."""
    from test_vlm_families import frame

    from infmllm_ros.bench.random_models import build_random_checkpoint
    from infmllm_ros.models import load_model
    from infmllm_ros.runtime.session import StreamSession

    model = load_model(str(build_random_checkpoint("qwen2.5-vl-tiny", tmp_path, seed=2)))
    answers = []
    for backend in (TorchBackend(model.decoder), CompiledBackend(model.decoder, **QUIET)):
        s = StreamSession(
            model,
            capacity=400,
            recent=32,
            sinks=4,
            system_prompt="Watch.",
            novelty_threshold=0.0,
            familiar_interval_s=0.0,
            backend=backend,
        )
        for i in range(3):
            s.ingest_frame(frame(i, 84, 112), float(i))
        assert s.cache.position_offset < 0  # images: positions lag their slots
        answer = s.ask("What did you see?", max_new_tokens=12)
        answers.append((answer.text, s.cache.k[:, :, : s.cache.length].clone()))
    assert answers[1][0] == answers[0][0]
    torch.testing.assert_close(answers[1][1], answers[0][1], atol=1e-5, rtol=1e-5)


def test_the_compiled_backend_refuses_a_score_rule_without_a_graph():
    dec = tiny_decoder()

    class Unfused(type(make_policy("h2o"))):
        fused_rule = None

    with pytest.raises(ValueError, match="has no engine graph"):
        make_backend("compiled", dec).load_engines(dec.new_cache(40, 8, Unfused(4, 8)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")
def test_the_cuda_graph_of_the_step_gives_the_eager_steps_logits(compile_once):
    dec = tiny_decoder().cuda()
    cache = dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8, beta=1e-2), slack=4)
    backend = CompiledBackend(dec, **QUIET)
    backend.load_engines(cache)
    step = DecoderStep(dec, 1e-2, True)
    g = torch.Generator().manual_seed(7)
    for n in CHUNKS + (1,) * 20:
        embeds = dec.embed(torch.randint(0, dec.cfg.vocab_size, (n,), generator=g).cuda())
        if n == 1:
            with torch.inference_mode():
                positions = torch.full((3, 1), cache.length, device="cuda")
                want = step(embeds[None], cache.k, cache.v, torch.tensor([cache.length], device="cuda"), positions)
                got = backend.step(embeds[None], cache.k, cache.v, cache.length, positions)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        backend.run_chunk(embeds, cache)
    assert cache.evicted_tokens > 0


def test_a_step_that_cannot_be_compiled_is_a_clear_error(monkeypatch):
    """No C++ compiler on a CPU machine: the node's configure fails with this message."""
    dec = tiny_decoder()

    def no_compiler(*args, **kwargs):
        raise OSError("[Errno 2] No such file or directory: 'g++'")

    monkeypatch.setattr(torch, "compile", lambda step, **kw: no_compiler)
    with pytest.raises(RuntimeError, match="could not build the decode step.*g\\+\\+.*backend torch"):
        CompiledBackend(dec, **QUIET).load_engines(dec.new_cache(40, 8, make_policy("inf_mllm", sinks=4, recent=8)))
