"""infmllm-bench-decode's arithmetic and arguments (the timings themselves are bench/results)."""
import pytest
import torch

from test_cache import tiny_decoder

from infmllm_ros.bench.decode import parse_args, token_bytes
from infmllm_ros.models.cpu_gemm import quantize_linears


def test_a_token_reads_every_weight_once_and_the_attended_keys_and_values():
    dec = tiny_decoder()
    c = dec.cfg
    d = c.head_dim
    per_layer = c.hidden_size * (c.num_heads * d + 2 * c.num_kv_heads * d) + c.num_heads * d * c.hidden_size \
        + 3 * c.hidden_size * c.intermediate_size
    weights = c.num_layers * per_layer + c.vocab_size * c.hidden_size  # + the LM head
    kv = 2 * c.num_layers * c.num_kv_heads * 100 * d
    assert token_bytes(dec, 100) == 4 * (weights + kv)
    quantize_linears(dec)  # int8 weights, a bf16 scale per output row, fp32 K/V
    rows = c.num_layers * (c.num_heads * d + 2 * c.num_kv_heads * d + c.hidden_size + 2 * c.intermediate_size
                           + c.hidden_size) + c.vocab_size
    assert token_bytes(dec, 100) == weights + 2 * rows + 4 * kv


@pytest.mark.parametrize("bad", [["--device", "cuda", "--precision", "int8"], ["--device", "cuda"],
                                 ["--backends", "tensorrt"], ["--stream-tokens", "512"]])
def test_arguments_the_benchmark_cannot_run_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--json", "x.json", *bad])


def test_transformers_gets_its_static_cache_on_cuda_and_its_dynamic_one_on_the_cpu():
    assert parse_args(["--json", "x.json"]).hf_cache == "dynamic"
    cuda = parse_args(["--json", "x.json", "--device", "cuda", "--precision", "fp32", "--peers", "transformers"])
    assert cuda.hf_cache == "static" and cuda.backends == ["torch", "compiled"]
