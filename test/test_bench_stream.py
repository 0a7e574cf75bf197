"""infmllm-bench-stream on a tiny random checkpoint: both sides measured, table written, bad input exits 2."""

import json

from infmllm_ros.bench.stream import main


def test_stream_bench_measures_ours_and_transformers(tmp_path):
    out = tmp_path / "stream.json"
    assert (
        main(
            [
                "--model",
                "smolvlm2-tiny",
                "--random-weights",
                "--slots",
                "512",
                "--frames",
                "1",
                "--new-tokens",
                "3",
                "--backends",
                "torch",
                "onnxruntime",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    (run,) = json.loads(out.read_text())["runs"]
    ours, peer, engines = run["ours"]["torch"], run["transformers"], run["ours"]["onnxruntime"]
    assert engines["engine_bytes"] > 0 and engines["prepare_s"] > 0 and engines["decode_tokens_per_s"] > 0
    assert engines["frame_tokens"] == ours["frame_tokens"] and engines["evict_ms"] > 0
    assert run["slots"] == 512 and ours["frame_tokens"] > 16  # a frame is its vision tokens + tag + markers
    assert ours["evict_ms"] > 0 and ours["vision_ms"] > 0 and ours["decode_tokens_per_s"] > 0
    assert 0 < 512 - peer["context_tokens"] < ours["frame_tokens"]  # transformers holds the same context
    assert peer["prefill_ms"] > 0 and peer["decode_tokens_per_s"] > 0
    table = out.with_suffix(".md").read_text()
    assert all(f"| 512 | {side} |" in table for side in ("ours torch", "ours onnxruntime", "transformers"))


def test_stream_bench_refuses_unknown_shapes_and_small_caches(tmp_path, capsys):
    assert main(["--model", "llava-7b", "--random-weights", "--json", str(tmp_path / "x.json")]) == 2
    assert "needs a shape" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                "smolvlm2-tiny",
                "--random-weights",
                "--slots",
                "300",
                "--no-peer",
                "--json",
                str(tmp_path / "y.json"),
            ]
        )
        == 2
    )
    assert "does not fit" in capsys.readouterr().err or "smaller than" in capsys.readouterr().err
