"""Decoder parity with transformers: tiny random LLaMA/Qwen2 checkpoints and real SmolLM2 from GGUF."""

import pytest
import torch
from conftest import tiny_hf_model

from infmllm_ros.kvcache import make_policy
from infmllm_ros.models import load_gguf, load_hf_checkpoint
from infmllm_ros.runtime import Sampling, decode
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
    got = torch.cat([dec.logits(dec(dec.embed(ids[s : s + 16]), cache)) for s in range(0, 40, 16)])
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


def test_the_gguf_reader_reads_the_fields_and_tensors_of_ggufs_own_reader():
    """The loader's reader parses metadata over a plain view of the mapping (faster): every field
    and tensor of SmolLM2's file as ``gguf.GGUFReader`` reads them, the tensors still mapped."""
    import numpy as np
    from gguf import GGUFReader

    from infmllm_ros.models import smollm2_gguf_path
    from infmllm_ros.models.gguf_loader import _Reader

    ours, theirs = _Reader(smollm2_gguf_path()), GGUFReader(smollm2_gguf_path())
    assert list(ours.fields) == list(theirs.fields) and len(theirs.fields["tokenizer.ggml.tokens"].data) == 49152
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, t.data_offset) for t in ours.tensors] == [
        (t.name, t.tensor_type, t.data_offset) for t in theirs.tensors
    ]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours.tensors, theirs.tensors))
    assert isinstance(ours.data, np.memmap) and isinstance(ours.tensors[0].data, np.memmap)


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    dec, tok = smollm2
    ids = tok.encode(
        "The robot drove along the highway at dusk, watching the lane markings "
        "and the traffic ahead. Suddenly a deer appeared near the shoulder, and the"
    )
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
        ref = smollm2_hf.generate(
            ids[None], max_new_tokens=32, do_sample=False, min_new_tokens=32, pad_token_id=tok.eos_id
        )[0, ids.numel() :].tolist()
    cache = dec.new_cache(256, 64, make_policy("full"))
    last = dec.logits(dec(dec.embed(ids), cache))[-1]
    got = decode(TorchBackend(dec), cache, last, 32)
    assert got == ref and len(got) == 32


def test_smollm2_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    from infmllm_ros.models import smollm2_gguf_path

    _, tok = smollm2
    path = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["Hello world", "t=312.5 s, cam=front: 2024 cars!", "naïve café — 東京", "<|im_start|>user\nhi"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref.encode(text, add_special_tokens=False), skip_special_tokens=True
        )
    assert tok.stop_ids == {2}  # <|im_end|> is id 2 in SmolLM2 and is also its eos


def test_repetition_controls_match_transformers_on_a_prompt_that_loops(smollm2, smollm2_hf):
    """Plain greedy repeats itself on this prompt; with repetition_penalty and
    no_repeat_ngram_size both sides choose the same 48 tokens and no 3-gram repeats."""
    dec, tok = smollm2
    prompt = tok.render_chat([{"role": "user", "content": "Repeat after me: the cat, the cat, the cat, the cat"}])
    ids = tok.encode(prompt)

    def ours(sampling):
        cache = dec.new_cache(256, 64, make_policy("full"))
        last = dec.logits(dec(dec.embed(torch.tensor(ids)), cache))[-1]
        return decode(TorchBackend(dec), cache, last, 48, sampling=sampling, history=ids)

    def grams(seq, n=4):
        return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]

    plain = ours(Sampling())
    assert len(set(grams(plain))) < len(grams(plain))  # the loop the controls must break
    for kw in (
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 3},
        {"repetition_penalty": 1.2, "no_repeat_ngram_size": 4},
    ):
        with torch.no_grad():
            ref = smollm2_hf.generate(
                torch.tensor([ids]),
                max_new_tokens=48,
                min_new_tokens=48,
                do_sample=False,
                pad_token_id=tok.eos_id,
                **kw,
            )[0, len(ids) :].tolist()
        assert ours(Sampling(**kw)) == ref, kw
    assert len(set(grams(ref, 4))) == len(grams(ref, 4))
    # banned sequences: a two-token sequence greedy writes, and a single token
    ban = ((plain[2], plain[3]), (plain[5],))
    with torch.no_grad():
        ref = smollm2_hf.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            min_new_tokens=48,
            do_sample=False,
            pad_token_id=tok.eos_id,
            bad_words_ids=[list(b) for b in ban],
        )[0, len(ids) :].tolist()
    assert ours(Sampling(bad_words_ids=ban)) == ref != plain
    assert plain[5] not in ref and all(ref[i : i + 2] != list(ban[0]) for i in range(len(ref) - 1))


def test_sampling_settings_are_checked_and_seeded_draws_repeat(smollm2):
    dec, tok = smollm2
    for bad in (
        {"repetition_penalty": 0.0},
        {"no_repeat_ngram_size": -1},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"temperature": float("nan")},
        {"bad_words_ids": ((),)},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Sampling(**bad)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": "Say something about roads."}]))

    def draw(seed):
        cache = dec.new_cache(256, 64, make_policy("full"))
        last = dec.logits(dec(dec.embed(torch.tensor(ids)), cache))[-1]
        return decode(TorchBackend(dec), cache, last, 12, sampling=Sampling(temperature=1.0, top_p=0.9, seed=seed))

    assert draw(1) == draw(1) and draw(1) != draw(2)


def test_text_cut_inside_a_character_ends_at_the_last_whole_character(smollm2):
    _, tok = smollm2
    text = "我们在路口看到了一只猫。"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some characters span several byte-level tokens
    cut_inside = 0
    for n in range(1, len(ids) + 1):
        raw = tok.tokenizer.decode(ids[:n], skip_special_tokens=True)
        cut_inside += raw.endswith("\ufffd")
        part = tok.decode(ids[:n])
        assert "\ufffd" not in part and text.startswith(part), (n, part)
    assert cut_inside > 0 and tok.decode(ids) == text
