"""infmllm-bench-ppl: clear errors for bad input, and a small end-to-end run writing JSON/MD/PNG."""

import json

import numpy as np
import pytest

from infmllm_ros.bench.perplexity import main, summarise


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return p


@pytest.mark.parametrize(
    "setup,args,message",
    [
        (lambda p: p.write_text("  \n"), [], "is empty"),
        (lambda p: p.write_bytes(b"\xff\xfe bad \xc3"), [], "is not UTF-8"),
        (None, ["--policy", "lru"], "unknown KV-cache policy 'lru'"),
        (None, ["--capacity", "40", "--recent", "16", "--chunk", "32"], "capacity 40 is smaller than sinks"),
        (None, ["--model", "/nonexistent/model.gguf"], "model file not found: /nonexistent/model.gguf"),
        (None, ["--offset", "-1"], "offset must be >= 0 tokens"),
        (None, ["--offset", "100000"], "fewer than 64 tokens after offset 100000"),
        (None, ["--device", "cuda:64"], "device 'cuda:64' asked for, but this machine has"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, text_file, capsys, setup, args, message):
    if setup:
        setup(text_file)
    code = main(["--text", str(text_file), "--json", str(tmp_path / "o.json"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_missing_text_file(tmp_path, capsys):
    assert main(["--text", str(tmp_path / "nope.txt"), "--json", str(tmp_path / "o.json")]) == 2
    assert "text file not found" in capsys.readouterr().err


def test_summary_buckets_and_flatness():
    nll = np.log(np.r_[np.full(50, 2.0), np.full(25, 3.0), np.full(25, 4.0)])
    times = np.r_[np.full(4, 9.0), np.full(10, 1.0), np.full(10, 1.5)]
    s = summarise(nll, times, capacity=64, chunk=16, buckets=4)
    assert s["bucket_ppl"] == pytest.approx([2.0, 2.0, 3.0, 4.0])
    assert s["last_over_second_decile"] == pytest.approx(2.0)
    assert s["chunk_time_ratio_last_first"] == pytest.approx(1.5)  # warm-up chunks excluded


def test_small_run_writes_json_markdown_and_plot(tmp_path, text_file):
    out = tmp_path / "ppl.json"
    code = main(
        [
            "--text",
            str(text_file),
            "--tokens",
            "300",
            "--capacity",
            "64",
            "--recent",
            "8",
            "--chunk",
            "16",
            "--policy",
            "window,inf_mllm",
            "--beta",
            "0,0.01",
            "--decay",
            "0",
            "--jobs",
            "1",
            "--offset",
            "5",
            "--hf-contexts",
            "",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"window@64", "inf_mllm@64,beta=0,decay=0", "inf_mllm@64,beta=0.01,decay=0"}
    run = data["runs"]["window@64"]
    assert run["evicted_tokens_per_row"] == 299 - 64  # tokens 0..298 are fed, 64 stay
    assert 1.0 < run["ppl"] < 1000 and len(run["bucket_ppl"]) == 10
    assert data["machine"]["cores"] >= 1
    assert "| 64 | window |" in out.with_suffix(".md").read_text()
    assert "300 tokens of t.txt from token 5," in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
