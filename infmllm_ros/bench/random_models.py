"""Random-weight Hugging Face checkpoints of the VLM families, built from config values alone.

No registry ships real VLM weights, and none are reachable from CI, so correctness is proven on
tiny random models against ``transformers`` (the tests) and speed is measured at real shapes
with random weights (speed does not depend on the values). :data:`SHAPES` is the table: a
family's ``transformers`` config class and the sizes, tiny ones for tests and those of the
published ``config.json`` of Qwen/Qwen2.5-VL-3B-Instruct, HuggingFaceTB/SmolVLM2-256M-Video-Instruct
and SmolVLM2-2.2B-Instruct (the hub is not reachable from here: check them against the real file
before relying on a figure; the vocabulary and the tokenizer are stand-ins).

A checkpoint is written the way ``save_pretrained`` writes one: ``config.json``,
``model.safetensors``, ``tokenizer.json`` (a byte-level BPE trained here with ``tokenizers``,
with the family's special tokens), ``tokenizer_config.json`` with a chat template modelled on
the family's, ``generation_config.json`` and ``preprocessor_config.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
SMOLVLM_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    "<image>",
]

#: ChatML as Qwen2-VL's template renders text turns (default system prompt included).
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: SmolVLM2's template (content as typed parts; roles capitalised; one <|im_start|> at the start).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]

#: ChatML with InternVL3's image part (``<IMG_CONTEXT>``, which its processor expands to
#: ``<img>`` + one ``<IMG_CONTEXT>`` per token + ``</img>``), modelled on the -hf checkpoints'.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
)
_QWEN_TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    out_hidden_size=64,
    intermediate_size=48,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
)
_SMOL_TINY_TEXT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1e5,
)
_SMOL_TINY_VISION = dict(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
)

_INTERNVL_TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1e6,
)
_INTERNVL_VISION_300M = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=[448, 448],
    patch_size=[14, 14],
    layer_scale_init_value=0.1,
)

#: Shape presets: family, text config, vision config, extra top-level config, image side (pixels).
SHAPES: dict[str, dict] = {
    "qwen2.5-vl-tiny": dict(
        family="qwen2_5_vl", vocab=640, text=_QWEN_TINY_TEXT, vision=_QWEN_TINY_VISION, tie=False, image=112
    ),
    "qwen2-vl-tiny": dict(
        family="qwen2_vl",
        vocab=640,
        text=_QWEN_TINY_TEXT,
        vision=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie=False,
        image=112,
    ),
    "qwen2.5-vl-3b": dict(
        family="qwen2_5_vl",
        vocab=151936,
        tie=True,
        image=448,
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2,
        ),
    ),
    "smolvlm2-tiny": dict(
        family="smolvlm", vocab=640, text=_SMOL_TINY_TEXT, vision=_SMOL_TINY_VISION, scale_factor=2, tie=False, image=64
    ),
    "smolvlm2-256m": dict(
        family="smolvlm",
        vocab=49280,
        tie=False,
        image=512,
        scale_factor=4,
        text=dict(
            model_type="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=1e5,
            rms_norm_eps=1e-5,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=512,
            patch_size=16,
        ),
    ),
    "smolvlm2-2.2b": dict(
        family="smolvlm",
        vocab=49280,
        tie=False,
        image=384,
        scale_factor=3,
        text=dict(
            model_type="llama",
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=16384,
            rope_theta=2.7e5,
            rms_norm_eps=1e-5,
        ),
        vision=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
        ),
    ),
    "qwen3-vl-tiny": dict(
        family="qwen3_vl",
        vocab=640,
        tie=False,
        image=128,
        text=dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
    ),
    "qwen3-vl-2b": dict(
        family="qwen3_vl",
        vocab=151936,
        tie=True,
        image=512,
        text=dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
    ),
    "internvl3-tiny": dict(
        family="internvl",
        vocab=640,
        tie=False,
        text=_INTERNVL_TINY_TEXT,
        top=dict(downsample_ratio=0.5),
        vision=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[64, 64],
            patch_size=[8, 8],
        ),
    ),
    "internvl3-1b": dict(
        family="internvl",
        vocab=151674,
        tie=True,
        top=dict(downsample_ratio=0.5),
        text=dict(
            model_type="qwen2",
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
        vision=_INTERNVL_VISION_300M,
    ),
    "internvl3-2b": dict(
        family="internvl",
        vocab=151674,
        tie=True,
        top=dict(downsample_ratio=0.5),
        text=dict(
            model_type="qwen2",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
        ),
        vision=_INTERNVL_VISION_300M,
    ),
}


def _qwen_processor(spec: dict, out: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=spec["image"] ** 2,
        patch_size=spec["vision"]["patch_size"],
        merge_size=spec["vision"]["spatial_merge_size"],
    ).save_pretrained(out)


def _smolvlm_processor(spec: dict, out: Path) -> None:
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    side = spec["vision"]["image_size"]
    SmolVLMImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    ).save_pretrained(out)


def _internvl_processor(spec: dict, out: Path) -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    h, w = spec["vision"]["image_size"]
    GotOcr2ImageProcessorPil(size={"height": h, "width": w}, crop_to_patches=False).save_pretrained(out)


_QWEN_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

#: Per family: transformers' config and model class, special tokens, chat template, end of turn,
#: the config's image-marker ids (key -> token) and the image processor it saves.
BUILDERS: dict[str, dict] = {
    "qwen2_5_vl": dict(
        config="Qwen2_5_VLConfig",
        model="Qwen2_5_VLForConditionalGeneration",
        specials=QWEN_SPECIALS,
        template=QWEN_TEMPLATE,
        eos="<|im_end|>",
        ids=_QWEN_IDS,
        processor=_qwen_processor,
    ),
    "qwen2_vl": dict(
        config="Qwen2VLConfig",
        model="Qwen2VLForConditionalGeneration",
        specials=QWEN_SPECIALS,
        template=QWEN_TEMPLATE,
        eos="<|im_end|>",
        ids=_QWEN_IDS,
        processor=_qwen_processor,
    ),
    "qwen3_vl": dict(
        config="Qwen3VLConfig",
        model="Qwen3VLForConditionalGeneration",
        specials=QWEN_SPECIALS,
        template=QWEN_TEMPLATE,
        eos="<|im_end|>",
        ids=_QWEN_IDS,
        processor=_qwen_processor,
    ),
    "smolvlm": dict(
        config="SmolVLMConfig",
        model="SmolVLMForConditionalGeneration",
        specials=SMOLVLM_SPECIALS,
        template=SMOLVLM_TEMPLATE,
        eos="<end_of_utterance>",
        ids={"image_token_id": "<image>"},
        processor=_smolvlm_processor,
    ),
    "internvl": dict(
        config="InternVLConfig",
        model="InternVLForConditionalGeneration",
        specials=INTERNVL_SPECIALS,
        template=INTERNVL_TEMPLATE,
        eos="<|im_end|>",
        ids={"image_token_id": "<IMG_CONTEXT>"},
        processor=_internvl_processor,
    ),
}


#: Chat lines in the training text, so the tiny tokenizers learn the merges real ones have where
#: a turn's opening meets its text (``" What"``, ``" <"``): a prompt tokenised in pieces differs
#: there from the template tokenised in one pass, and the tests must be able to see it.
CHAT_LINES = "User: What did the front camera see? <frame t=3.0s cam=front> Question: What was there?\n" * 200


def train_tokenizer(specials: list[str], vocab_size: int = 600):
    """A byte-level BPE (``tokenizers``) trained on this package's own source text and
    :data:`CHAT_LINES`, with ``specials`` as its first ids. Deterministic for a given source tree."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(__file__).resolve().parents[1]
    corpus = [p.read_text() for p in sorted(root.rglob("*.py"))] + [CHAT_LINES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return tok


def build_random_checkpoint(
    shape: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int | None = None
) -> Path:
    """Write a random-weight checkpoint of ``shape`` (:data:`SHAPES`) into ``out``.

    Args:
        seed: ``torch.manual_seed`` before the weights are drawn (same seed, same weights).
        dtype: weight dtype written.
        layers: keep only this many decoder layers (None: the shape's): a real shape's per-layer
            cost where the whole model does not fit in memory twice (a token's decoder cost is
            linear in the layers).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: an unknown shape (the message lists them).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    spec = SHAPES[shape]
    build = BUILDERS[spec["family"]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(build["specials"])
    eos = tok.token_to_id(build["eos"])
    text = {
        **spec["text"],
        **({"num_hidden_layers": layers} if layers else {}),
        "vocab_size": spec["vocab"],
        "tie_word_embeddings": spec["tie"],
        "eos_token_id": eos,
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "pad_token_id": None,
    }
    torch.manual_seed(seed)
    import transformers

    config, model_class = getattr(transformers, build["config"]), getattr(transformers, build["model"])
    top = {**spec.get("top", {}), **({"scale_factor": spec["scale_factor"]} if "scale_factor" in spec else {})}
    cfg = config(
        text_config=text,
        vision_config=spec["vision"],
        tie_word_embeddings=spec["tie"],
        **top,
        **{key: tok.token_to_id(token) for key, token in build["ids"].items()},
    )
    model = model_class._from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": build["template"],
                "eos_token": build["eos"],
                "bos_token": None,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 32768,
            },
            indent=1,
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "do_sample": False}))
    build["processor"](spec, out)
    return out


def main(argv=None) -> int:
    """``infmllm-random-checkpoint SHAPE OUT_DIR``: write a random-weight checkpoint (exit 2 on bad input)."""
    from ..models.registry import DTYPES

    p = argparse.ArgumentParser(prog="infmllm-random-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("shape", help=f"one of {', '.join(sorted(SHAPES))}")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    try:
        build_random_checkpoint(args.shape, args.out, args.seed, DTYPES[args.dtype])
    except ValueError as exc:
        print(f"infmllm-random-checkpoint: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0
