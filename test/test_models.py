"""Decoder parity with transformers: tiny random LLaMA/Qwen2 checkpoints and real SmolLM2 from GGUF."""
import pytest
import torch

from conftest import tiny_hf_model
from infmllm_ros.kvcache import make_policy
from infmllm_ros.models import load_gguf, load_hf_checkpoint
from infmllm_ros.runtime import greedy_decode
from infmllm_ros.runtime.backends import TorchBackend


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_safetensors_checkpoint_matches_transformers(tmp_path, arch):
    hf = tiny_hf_model(arch, seed=3)
    hf.save_pretrained(tmp_path)
    dec, tok = load_hf_checkpoint(tmp_path)
    assert tok is None and dec.cfg.attention_bias == (arch == "qwen2")
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    cache = dec.new_cache(64, 16, make_policy("full"))
    got = torch.cat([dec.logits(dec(dec.embed(ids[s:s + 16]), cache)) for s in range(0, 40, 16)])
    assert (got - ref).abs().max().item() < 1e-4


def test_hf_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_hf_checkpoint(tmp_path)


def test_gguf_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf(bad)


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    dec, tok = smollm2
    ids = tok.encode("The robot drove along the highway at dusk, watching the lane markings "
                     "and the traffic ahead. Suddenly a deer appeared near the shoulder, and the")
    ids = torch.tensor((ids * 4)[:64])
    assert ids.numel() == 64
    with torch.no_grad():
        ref = smollm2_hf(ids[None]).logits[0]
    cache = dec.new_cache(128, 64, make_policy("full"))
    got = dec.logits(dec(dec.embed(ids), cache))
    assert (got - ref).abs().max().item() < 1e-3


def test_smollm2_greedy_tokens_match_transformers(smollm2, smollm2_hf):
    dec, tok = smollm2
    prompt = tok.render_chat([{"role": "user", "content": "Name three things a robot car might see on a road."}])
    ids = torch.tensor(tok.encode(prompt))
    with torch.no_grad():
        ref = smollm2_hf.generate(ids[None], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                  pad_token_id=tok.eos_id)[0, ids.numel():].tolist()
    cache = dec.new_cache(256, 64, make_policy("full"))
    last = dec.logits(dec(dec.embed(ids), cache))[-1]
    got = greedy_decode(TorchBackend(dec), cache, last, 32)
    assert got == ref and len(got) == 32


def test_smollm2_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    from infmllm_ros.models import smollm2_gguf_path

    _, tok = smollm2
    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world", "t=312.5 s, cam=front: 2024 cars!", "naïve café — 東京", "<|im_start|>user\nhi"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False),
                                                          skip_special_tokens=True)
    assert tok.stop_ids == {2}  # <|im_end|> is id 2 in SmolLM2 and is also its eos
