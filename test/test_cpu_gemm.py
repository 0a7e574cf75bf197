"""Packed oneDNN linears: same outputs as the dense model, exact weights back for export, and
a clear refusal to move to another device or dtype."""
import pytest
import torch
from torch import nn

from infmllm_ros.kvcache import make_policy
from infmllm_ros.models.cpu_gemm import PackedLinear, dense_linears, pack_linears
from test_cache import stream_logits, tiny_decoder

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN: nothing is packed")


@needs_onednn
def test_packed_decoder_streams_the_same_logits():
    dense, packed = tiny_decoder(), tiny_decoder()
    linears = sum(isinstance(m, nn.Linear) for m in dense.modules())
    assert pack_linears(packed, rows_hint=16) == linears - 1  # every projection but the LM head
    assert isinstance(packed.model.layers[0].mlp.up_proj, PackedLinear)
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
        layer = model.model.layers[1].self_attn.q_proj
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, dense.model.layers[1].self_attn.q_proj.weight)
    assert isinstance(packed.model.layers[1].self_attn.q_proj, PackedLinear)


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
