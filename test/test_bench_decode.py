"""infmllm-bench-decode's arithmetic and arguments (the timings themselves are bench/results)."""

import pytest
from test_cache import tiny_decoder

from infmllm_ros.bench.decode import parse_args, token_bytes
from infmllm_ros.models.cpu_gemm import quantize_linears


def test_a_token_reads_every_weight_once_and_the_attended_keys_and_values():
    dec = tiny_decoder()
    c = dec.cfg
    d = c.head_dim
    per_layer = (
        c.hidden_size * (c.num_heads * d + 2 * c.num_kv_heads * d)
        + c.num_heads * d * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    weights = c.num_layers * per_layer + c.vocab_size * c.hidden_size  # + the LM head
    kv = 2 * c.num_layers * c.num_kv_heads * 100 * d
    assert token_bytes(dec, 100) == 4 * (weights + kv)
    quantize_linears(dec)  # int8 weights, a bf16 scale per output row, fp32 K/V
    rows = (
        c.num_layers
        * (c.num_heads * d + 2 * c.num_kv_heads * d + c.hidden_size + 2 * c.intermediate_size + c.hidden_size)
        + c.vocab_size
    )
    assert token_bytes(dec, 100) == weights + 2 * rows + 4 * kv


@pytest.mark.parametrize(
    "bad",
    [
        ["--device", "cuda", "--precision", "int8"],
        ["--device", "cuda"],
        ["--backends", "tensorrt"],
        ["--stream-tokens", "512"],
    ],
)
def test_arguments_the_benchmark_cannot_run_are_refused(bad):
    with pytest.raises(SystemExit):
        parse_args(["--json", "x.json", *bad])


def test_transformers_gets_its_static_cache_on_cuda_and_its_dynamic_one_on_the_cpu():
    assert parse_args(["--json", "x.json"]).hf_cache == "dynamic"
    cuda = parse_args(["--json", "x.json", "--device", "cuda", "--precision", "fp32", "--peers", "transformers"])
    assert cuda.hf_cache == "static" and cuda.backends == ["torch", "compiled"]


def test_a_vlm_checkpoint_is_timed_against_its_own_transformers_class(tmp_path):
    """The mode a GPU machine runs at a real shape (random weights time the same), here tiny."""
    import json

    from infmllm_ros.bench.decode import main
    from infmllm_ros.bench.random_models import build_random_checkpoint

    ckpt = build_random_checkpoint("qwen2.5-vl-tiny", tmp_path / "qwen", seed=1)
    out = tmp_path / "decode.json"
    assert (
        main(
            [
                "--model",
                str(ckpt),
                "--precision",
                "fp32",
                "--backends",
                "torch",
                "--peers",
                "transformers",
                "--hf-cache",
                "static",
                "--capacity",
                "512",
                "--stream-tokens",
                "600",
                "--prompt-tokens",
                "300",
                "--decode",
                "4",
                "--frames",
                "2",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    ours, peer = result["ours"]["fp32"], result["peers"]["transformers"]
    assert ours["decode_tok_s"] > 0 and peer["decode_tok_s"] > 0 and peer["cache"] == "static"
    assert result["ratios"]["fp32/transformers"]["decode"] == ours["decode_tok_s"] / peer["decode_tok_s"]
    assert str(ckpt) in out.with_suffix(".md").read_text()  # the table names what it timed
    with pytest.raises(SystemExit):  # llama.cpp runs the preset's GGUF only
        parse_args(["--model", str(ckpt), "--json", "x.json", "--precision", "fp32"])
