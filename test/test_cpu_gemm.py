"""CPU linears: packed oneDNN (same outputs as the dense model, exact weights back for export) and
weight-only int8 (close to fp32 by a stated measure); both refuse to move to another device or dtype."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_hf_model
from test_cache import stream_logits, tiny_decoder
from torch import nn

from infmllm_ros.kvcache import make_policy
from infmllm_ros.models import load_gguf, load_hf_checkpoint, load_model, smollm2_gguf_path
from infmllm_ros.models.cpu_gemm import (
    Int8Linear,
    PackedLinear,
    dense_linears,
    fuse_projections,
    pack_linears,
    quantize_int8,
    quantize_linears,
)

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN: nothing is packed"
)


@needs_onednn
def test_packed_decoder_streams_the_same_logits():
    dense, packed = tiny_decoder(), tiny_decoder()
    # every projection but the LM head, q/k/v and gate/up fused first: 4 products per layer
    assert pack_linears(packed, rows_hint=16) == 4 * dense.cfg.num_layers
    assert isinstance(packed.model.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(packed.model.layers[0].self_attn.qkv_proj, PackedLinear)
    assert packed.model.layers[0].mlp.up_proj is None and packed.model.layers[0].self_attn.k_proj is None
    assert isinstance(packed.lm_head, nn.Linear)
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(1))
    policy = dict(sinks=4, recent=16)
    want = stream_logits(dense, dense.new_cache(64, 16, make_policy("inf_mllm", **policy)), ids, 16)
    got = stream_logits(packed, packed.new_cache(64, 16, make_policy("inf_mllm", **policy)), ids, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_dense_linears_gives_back_the_exact_weights_and_repacks():
    dense, packed = tiny_decoder(), tiny_decoder()
    pack_linears(packed)
    with dense_linears(packed) as model:
        layer = model.model.layers[1].self_attn.qkv_proj
        assert type(layer) is nn.Linear
        want = dense.model.layers[1].self_attn
        assert torch.equal(layer.weight, torch.cat([want.q_proj.weight, want.k_proj.weight, want.v_proj.weight]))
    assert isinstance(packed.model.layers[1].self_attn.qkv_proj, PackedLinear)


@needs_onednn
def test_packed_model_refuses_to_change_device_or_dtype():
    packed = tiny_decoder()
    pack_linears(packed)
    with pytest.raises(RuntimeError, match="cannot change device or dtype"):
        packed.half()


def test_models_that_cannot_be_packed_are_left_alone():
    half = tiny_decoder().half()
    assert pack_linears(half) == 0
    assert not any(isinstance(m, PackedLinear) for m in half.modules())


def test_int8_weights_round_to_the_nearest_step_of_each_channels_scale():
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 48)[:, None]
    w[5] = 0.0  # an all-zero channel keeps scale 1 and exact zeros
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale[5] == 1.0 and not q[5].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # round to nearest
    torch.testing.assert_close(scale[:5], w[:5].abs().amax(1) / 127)


def test_int8_linear_computes_the_product_with_its_dequantised_weight():
    layer = nn.Linear(64, 96).requires_grad_(False)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    q = Int8Linear(layer)
    dense = q.dense()
    want = x.bfloat16().float() @ dense.weight.T + layer.bias  # activations rounded to bf16
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (7, 96)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # the kernel's bf16 output rounding
    assert q(x[0]).shape == (96,)  # any leading shape


def test_int8_smollm2_stays_within_stated_bounds_of_fp32(smollm2):
    """SmolLM2-135M, 128 tokens of this README in chunks of 32 plus 8 decoded single tokens:
    weight-only int8 agrees with fp32 on >= 90% of next-token argmaxes, the mean KL divergence
    of its next-token distribution from fp32's is < 0.02 nats, and perplexity moves < 3%
    (measured here: 95%, 0.008 nats, 0.3%)."""
    dense, tok = smollm2  # the shared fp32 model, read only
    int8, _ = load_gguf(smollm2_gguf_path())
    assert quantize_linears(int8) == 30 * 4 + 1  # qkv, o, gate_up and down per layer, and the LM head
    attn = int8.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj, Int8Linear) and attn.q_proj is None
    assert isinstance(int8.lm_head, Int8Linear) and int8.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor(tok.encode((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"))[:136])

    def run(dec):
        cache = dec.new_cache(256, 32, make_policy("full"))
        prefill = stream_logits(dec, cache, ids[:128], 32)
        return torch.cat([prefill] + [dec.logits(dec(dec.embed(ids[i : i + 1]), cache)) for i in range(128, 136)])

    want, got = run(dense).log_softmax(-1), run(int8).log_softmax(-1)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.9
    assert (want.exp() * (want - got)).sum(-1).mean() < 0.02
    nll = [-lp[:-1].gather(1, ids[1:, None]).mean() for lp in (want, got)]
    assert abs(float((nll[1] - nll[0]).exp()) - 1) < 0.03


def test_int8_model_refuses_to_change_device_and_dense_linears_gives_the_dequantised_weights():
    dec = tiny_decoder()
    quantize_linears(dec)
    with pytest.raises(RuntimeError, match="cannot change device or dtype"):
        dec.half()
    layer = dec.model.layers[0].mlp.down_proj
    with dense_linears(dec) as model:
        dense = model.model.layers[0].mlp.down_proj
        assert type(dense) is nn.Linear
        assert torch.equal(dense.weight, layer.weight_int8.float() * layer.scale.float()[:, None])
    assert dec.model.layers[0].mlp.down_proj is layer


def test_int8_precision_is_refused_off_the_cpu_before_anything_loads():
    with pytest.raises(ValueError, match="int8 is a CPU path"):
        load_model("no-such-model", device="cuda", precision="int8")
    with pytest.raises(ValueError, match="int8"):  # the message lists the precisions
        load_model("smollm2-135m", precision="int4")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases are stacked too
def test_fused_projections_compute_what_the_separate_ones_did(arch, tmp_path):
    tiny_hf_model(arch, seed=3).save_pretrained(tmp_path)
    separate, fused = (load_hf_checkpoint(tmp_path)[0] for _ in range(2))
    assert fuse_projections(fused) == 2 * fused.cfg.num_layers and fuse_projections(fused) == 0
    layer = fused.model.layers[0]
    assert layer.self_attn.q_proj is None and layer.mlp.gate_proj is None
    assert layer.self_attn.qkv_proj.weight.shape[0] == sum(layer.self_attn.qkv_widths)
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(3))
    policy = dict(sinks=4, recent=16)
    want = stream_logits(separate, separate.new_cache(40, 16, make_policy("inf_mllm", **policy)), ids, 16)
    got = stream_logits(fused, fused.new_cache(40, 16, make_policy("inf_mllm", **policy)), ids, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
