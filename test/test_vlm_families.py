"""Qwen2.5-VL, Qwen2-VL, SmolVLM2 and InternVL3 behind the family interface, against transformers on
tiny random models.

Each checkpoint is built by the test from a transformers config (random weights, a BPE trained
here), saved as a Hugging Face directory and loaded by both sides: our families
(``infmllm_ros.models.load_model``) and transformers' ``*ForConditionalGeneration``.
"""

import numpy as np
import pytest
import torch

from infmllm_ros.bench.random_models import build_random_checkpoint
from infmllm_ros.kvcache import SlotKind
from infmllm_ros.models import load_model
from infmllm_ros.runtime.generate import Sampling
from infmllm_ros.runtime.session import StreamSession

SHAPES = ("qwen2.5-vl-tiny", "qwen2-vl-tiny", "qwen3-vl-tiny", "smolvlm2-tiny", "internvl3-tiny")
QUESTION = "What did the front camera see, and when?"


def frame(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A random but structured RGB frame (smooth gradients + noise), uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(3 * (xx + yy) + 2 * seed)], -1)
    return np.clip(127 + 100 * base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", params=SHAPES)
def family(request, tmp_path_factory):
    """(shape, our model, transformers' model) of one tiny random checkpoint."""
    from transformers import AutoModelForImageTextToText

    path = build_random_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    ours = load_model(str(path))
    ref = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    return request.param, ours, ref


def reference_inputs(model, chunk_ids: list[int], rgb: np.ndarray) -> dict:
    """transformers' inputs for ``chunk_ids`` with the frame's pixels, from the family's processor."""
    ids = torch.tensor([chunk_ids])
    if hasattr(model, "visual"):  # Qwen: pixels + grid, and which tokens are image tokens (M-RoPE)
        px = model.processor(images=[rgb], return_tensors="pt")
        return {
            "input_ids": ids,
            "pixel_values": px["pixel_values"],
            "image_grid_thw": px["image_grid_thw"],
            "mm_token_type_ids": (ids == model.image_token_id).int(),
        }
    if model.family == "internvl":  # one tile
        return {"input_ids": ids, "pixel_values": model.vision_inputs(rgb).pixels[0]}
    px = model.processor(images=[[rgb]], return_tensors="pt")
    return {"input_ids": ids, "pixel_values": px["pixel_values"], "pixel_attention_mask": px["pixel_attention_mask"]}


def prompt(session: StreamSession, rgb: np.ndarray, stamp: float = 3.0):
    """Our chunks for system prompt + one frame + the question turn (without a memory line),
    and the same as one id list."""
    model = session.model
    chunk = model.frame_chunk(f"<frame t={stamp:.1f}s cam=front>", model.encode_frame(rgb))
    head, lead, newline, tail = session.question_turn()
    question = head + session.operator_ids(QUESTION, lead) + newline + tail
    return chunk, question, session._system_ids + chunk.ids(model.image_token_id) + question


def test_vision_embeddings_equal_transformers(family):
    _, ours, ref = family
    rgb = frame(0)
    got = ours.encode_frame(rgb).embeds
    inputs = reference_inputs(ours, [0], rgb)
    with torch.no_grad():
        if hasattr(ours, "visual"):
            want = ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        elif ours.family == "internvl":
            want = ref.model.get_image_features(
                inputs["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
            ).pooler_output[0]
        else:
            want = ref.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output[0]
    assert got.shape == want.shape and got.shape[0] == ours.encode_frame(rgb).grid[0] * ours.encode_frame(rgb).grid[1]
    assert (got - want).abs().max().item() <= 1e-4


def test_image_and_text_prompt_logits_equal_transformers(family):
    """Every position's logits: system chunk, frame chunk (M-RoPE positions for Qwen), question."""
    _, ours, ref = family
    rgb = frame(1)
    s = StreamSession(ours, capacity=512, policy="full", recent=64)
    chunk, question, ids = prompt(s, rgb)
    dec, cache = ours.decoder, s.cache
    cache.reset()
    step = cache.max_chunk
    hidden = [
        dec(dec.embed(torch.tensor(s._system_ids[i : i + step])), cache, SlotKind.SINK)
        for i in range(0, len(s._system_ids), step)
    ]
    embeds, kinds = s.chunk_embeds(chunk)
    hidden.append(dec(embeds, cache, kinds, mrope=chunk.mrope, deepstack=chunk.deepstack_inputs()))
    hidden += [dec(dec.embed(torch.tensor(question[i : i + step])), cache) for i in range(0, len(question), step)]
    got = dec.logits(torch.cat(hidden))
    with torch.no_grad():
        want = ref(**reference_inputs(ours, ids, rgb)).logits[0]
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


#: How each family's transformers processor expands the template's image part into vision tokens
#: (``Qwen2_5_VLProcessor``: each ``<|image_pad|>`` becomes one per token; ``SmolVLMProcessor``:
#: ``<image>`` becomes the global image's markers around one ``<image>`` per token).
IMAGE_EXPANSION = {
    "qwen": ("<|image_pad|>", lambda n: "<|image_pad|>" * n),
    "smolvlm": (
        "<image>",
        lambda n: "<fake_token_around_image><global-img>" + "<image>" * n + "<fake_token_around_image>",
    ),
    "internvl": ("<IMG_CONTEXT>", lambda n: "<img>" + "<IMG_CONTEXT>" * n + "</img>"),
}


def test_prompt_ids_are_the_chat_template_tokenised_in_one_pass(family):
    """System prompt, a frame turn and a question turn: our ids, built chunk by chunk, equal the
    checkpoint's own template (transformers' apply_chat_template) tokenised in one pass by the
    checkpoint's tokenizer, vision tokens expanded as the processor expands them. The question's
    content ends with the newline after which a memory line would go."""
    from transformers import AutoTokenizer

    _, ours, _ = family
    s = StreamSession(ours, capacity=512, policy="full", recent=64)
    tag = "<frame t=3.0s cam=front>"
    chunk = ours.frame_chunk(tag, ours.encode_frame(frame(1)))
    head, lead, newline, tail = s.question_turn()
    got = s._system_ids + chunk.ids(ours.image_token_id) + head + s.operator_ids(QUESTION, lead) + newline + tail
    hf = AutoTokenizer.from_pretrained(str(ours.checkpoint))
    text = hf.apply_chat_template(
        [
            {"role": "system", "content": [{"type": "text", "text": s.template.system_prompt}]},
            {"role": "user", "content": [{"type": "text", "text": tag + ours.novel_text}, {"type": "image"}]},
            {"role": "user", "content": [{"type": "text", "text": QUESTION + "\n"}]},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    marker, expand = IMAGE_EXPANSION["qwen" if hasattr(ours, "visual") else ours.family]
    assert text.count(marker) == 1
    want = hf(text.replace(marker, expand(chunk.vision_tokens)), add_special_tokens=False).input_ids
    assert got == want


def test_full_cache_session_answers_token_for_token_like_generate(family):
    _, ours, ref = family
    rgb = frame(2)
    s = StreamSession(
        ours,
        capacity=512,
        policy="full",
        recent=64,
        novelty_threshold=0.0,
        evidence_sightings=0,
        sampling=Sampling(),
        sentence_stop_words=0,
    )  # plain greedy, the prompt generate() gets
    _, question, ids = prompt(s, rgb)
    r = s.ingest_frame(rgb, 3.0)
    assert r.novel and r.stored and r.tokens == len(ids) - len(s._system_ids) - len(question)
    answer = s.ask(QUESTION, max_new_tokens=16)
    with torch.no_grad():
        out = ref.generate(
            **reference_inputs(ours, ids, rgb),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=sorted(ours.tokenizer.stop_ids),
            pad_token_id=0,
        )
    want = out[0, len(ids) :].tolist()
    want = want[: next((i for i, t in enumerate(want) if t in ours.tokenizer.stop_ids), len(want))]
    assert list(answer.token_ids) == want and len(want) >= 1
    assert answer.frames_in_context == 1 and answer.first_frame_s == 3.0


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_random_checkpoint("qwen2.5-vl-tiny", tmp_path_factory.mktemp("qwen-bad"), seed=3)


def broken_copy(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration.*not supported.*Qwen2_5_VL.*SmolVLM"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_model(str(tmp_path / "absent"))


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "preprocessor_config.json", "config.json"])
def test_a_missing_checkpoint_file_is_named(qwen_dir, tmp_path, missing):
    path = broken_copy(qwen_dir, tmp_path / "m", lambda d: (d / missing).unlink())
    with pytest.raises(
        FileNotFoundError, match=missing.replace(".", r"\.") if missing != "model.safetensors" else r"\.safetensors"
    ):
        load_model(path)


def test_weights_that_disagree_with_the_config_are_refused(qwen_dir, tmp_path):
    import json

    def widen(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] = 128
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(
        ValueError, match=r"shapes disagree.*mlp\..*proj\.weight: checkpoint \(96, 64\), config \(128, 64\)"
    ):
        load_model(broken_copy(qwen_dir, tmp_path / "w", widen))


def test_a_wrong_hidden_size_is_named_before_anything_derived_from_it(qwen_dir, tmp_path):
    """hidden_size fixes head_dim and so the M-RoPE sections' sum: the shapes are checked first."""
    import json

    def resize(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"]["hidden_size"] = 96
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(
        ValueError,
        match=r"shapes disagree.*hidden_size.*embed_tokens\.weight: checkpoint "
        r"\(640, 64\), config \(640, 96\)",
    ):
        load_model(broken_copy(qwen_dir, tmp_path / "h", resize))


def test_a_cut_short_weight_file_is_named(qwen_dir, tmp_path):
    def cut(d):
        weights = d / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    path = broken_copy(qwen_dir, tmp_path / "c", cut)
    with pytest.raises(ValueError, match=r"weight file .*model\.safetensors cannot be read .*cut short"):
        load_model(path)


def test_a_frame_the_processor_cannot_take_changes_nothing(qwen_dir):
    model = load_model(str(qwen_dir))
    s = StreamSession(model, capacity=256, recent=32, sinks=4, system_prompt="Watch.", novelty_threshold=0.0)
    s.ingest_frame(frame(0), 1.0)
    before = (s.cache.length, s.cache.position_offset, s.frames_ingested, s.cache.k.clone())
    for bad, error in (
        (np.zeros((4, 4, 3), np.uint8), "too small"),
        (np.zeros((10, 4000, 3), np.uint8), "aspect ratio"),
        (np.zeros((32, 32), np.uint8), "RGB"),
    ):
        with pytest.raises(ValueError, match=error):
            s.ingest_frame(bad, 2.0)
    assert (s.cache.length, s.cache.position_offset, s.frames_ingested) == before[:3]
    assert torch.equal(s.cache.k, before[3])
    assert s.ingest_frame(frame(1), 2.0).stored  # and the stream goes on
