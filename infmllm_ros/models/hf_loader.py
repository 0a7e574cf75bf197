"""Read Hugging Face checkpoint folders (``config.json`` + ``*.safetensors`` + ``tokenizer.json``).

Text-only LLaMA / Qwen2 checkpoints load into a :class:`Decoder` here
(:func:`load_hf_checkpoint`); the VLM families (:mod:`.qwen_vl`, :mod:`.smolvlm`, :mod:`.internvl`) use the
same pieces for their language model and hand the rest of the weights to their vision tower.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .decoder import Decoder, DecoderConfig
from .tokenizer import ChatTokenizer

_ARCHS = {"LlamaForCausalLM": False, "Qwen2ForCausalLM": True}  # -> q/k/v bias


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder as a dict.

    Raises:
        FileNotFoundError: no such folder, or no ``config.json`` in it (the message names it).
        ValueError: the file is not valid JSON.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from exc


def decoder_config(text: dict, attention_bias: bool = False, **extra) -> DecoderConfig:
    """A :class:`DecoderConfig` from a LLaMA / Qwen2 ``config.json`` (or a VLM's ``text_config``).

    Reads ``rope_theta`` and M-RoPE's ``mrope_section`` (and ``mrope_interleaved``) from either
    the 4.x fields (``rope_theta``, ``rope_scaling``) or transformers 5's ``rope_parameters``;
    ``extra``: :class:`DecoderConfig` fields a family sets itself (``qk_norm``, ``deepstack_layers``).

    Raises:
        ValueError: a missing size field, or RoPE scaling other than M-RoPE.
    """
    rope = dict(text.get("rope_scaling") or {})
    rope.update(text.get("rope_parameters") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    mrope = rope.get("mrope_section")
    if kind not in ("default", "mrope") and mrope is None:
        raise ValueError(f"RoPE scaling {rope} is not supported (default and M-RoPE are)")
    try:
        n_heads = text["num_attention_heads"]
        return DecoderConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=n_heads,
            num_kv_heads=text.get("num_key_value_heads") or n_heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // n_heads,
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            attention_bias=attention_bias or bool(text.get("attention_bias", False)),
            max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
            mrope_section=tuple(mrope) if mrope else None,
            mrope_interleaved=bool(rope.get("mrope_interleaved")),
            **extra,
        )
    except KeyError as exc:
        raise ValueError(f"config has no {exc.args[0]!r}") from exc


def read_vlm_config(path: Path, attention_bias: bool = False, **extra) -> tuple[dict, DecoderConfig]:
    """A VLM checkpoint folder's ``config.json`` and its language model's :class:`DecoderConfig`
    (``text_config``, or the top level for 4.x Qwen2-VL files; tied embeddings from either).

    Raises:
        FileNotFoundError: no ``config.json``, ``tokenizer.json`` or ``preprocessor_config.json``
            (named). ValueError: no ``image_token_id``, or see :func:`decoder_config`.
    """
    hf = read_config(path)
    for required in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / required).is_file():
            raise FileNotFoundError(f"no {required} in {path}")
    if "image_token_id" not in hf:
        raise ValueError(f"{path}/config.json has no image_token_id")
    text = hf.get("text_config") or hf
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return hf, decoder_config({**text, "tie_word_embeddings": tie}, attention_bias, **extra)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's ``*.safetensors`` shards, by name.

    Raises:
        FileNotFoundError: no ``.safetensors`` file, or a shard named in
            ``model.safetensors.index.json`` that is missing (the message names it).
        ValueError: a shard safetensors cannot read (cut short, or another format; named).
    """
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        shards = [path / n for n in names]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"weight file {shard} (named in {index.name}) is missing")
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors weights in {path} (expected model.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(shard)))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
            raise ValueError(f"weight file {shard} cannot be read ({exc}): cut short or not safetensors") from exc
    return state


def take_prefixed(
    state: dict[str, torch.Tensor], prefixes: tuple[str, ...], rename: str = ""
) -> dict[str, torch.Tensor]:
    """Remove from ``state`` the tensors whose names start with one of ``prefixes`` (first match
    wins) and return them with that prefix replaced by ``rename``: checkpoints name the same part
    differently across transformers versions (``model.language_model.`` vs ``model.``)."""
    taken = {}
    for name in list(state):
        for prefix in prefixes:
            if name.startswith(prefix):
                taken[rename + name[len(prefix) :]] = state.pop(name)
                break
    return taken


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """``module.load_state_dict(state, assign=assign)`` with errors that name the tensors
    (``assign``: the module, built on the meta device, takes ``state``'s tensors as they are).

    Raises:
        ValueError: missing or unexpected tensors, or a tensor whose shape disagrees with the
            config (``what`` names the checkpoint part in the message).
    """
    own = module.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)}, config {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(
            f"{what}: tensor shapes disagree with the config (config.json, or the GGUF metadata): "
            f"{'; '.join(wrong[:4])}"
        )
    missing, unexpected = module.load_state_dict(state, strict=False, assign=assign)
    if missing or unexpected:
        raise ValueError(f"{what}: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")


def check_decoder_shapes(cfg: DecoderConfig, state: dict[str, torch.Tensor], what: str) -> None:
    """Compare the tensors that fix a decoder's sizes with ``cfg``, before anything is derived
    from those sizes (head_dim and the M-RoPE sections follow from hidden_size / heads: a wrong
    hidden_size must be named as such, not as a RoPE error).

    Raises:
        ValueError: a tensor whose shape disagrees (named, with both shapes).
    """
    d = cfg.head_dim
    want = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (cfg.num_heads * d, cfg.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (cfg.num_kv_heads * d, cfg.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
    }
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)}, config {shape}"
        for k, shape in want.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    if wrong:
        raise ValueError(
            f"{what}: tensor shapes disagree with the config (config.json, or the GGUF metadata): hidden_size, "
            f"heads, vocab_size or intermediate_size: {'; '.join(wrong)}"
        )


def load_decoder(cfg: DecoderConfig, state: dict[str, torch.Tensor], what: str) -> Decoder:
    """A :class:`Decoder` from HF-named tensors (``model.layers.N...``, ``lm_head.weight``).

    Raises:
        ValueError: see :func:`check_decoder_shapes` and :func:`load_module_state`.
    """
    check_decoder_shapes(cfg, state, what)
    with torch.device("meta"):  # no random weights allocated and initialised before the real ones
        decoder = Decoder(cfg)
    if cfg.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_module_state(decoder, state, what, assign=True)
    if cfg.tie_word_embeddings:  # assignment gave the head a parameter of its own: one again
        decoder.lm_head.weight = decoder.model.embed_tokens.weight
    return decoder.requires_grad_(False).eval()


def load_vlm_parts(
    path: Path,
    cfg: DecoderConfig,
    parts: dict[str, tuple[tuple[str, ...], Callable]],
    text_prefixes: tuple[str, ...],
    head_prefixes: tuple[str, ...] = ("lm_head.",),
):
    """A VLM checkpoint's language model and its vision modules, from one read of its weights.

    Args:
        path: the checkpoint folder. cfg: its language model's shape (:func:`read_vlm_config`).
        parts: name -> (weight-name prefixes, ``transformers`` config -> empty module), taken from
            the weights in this order before the language model's (whose prefix may be as short
            as ``model.``).
        text_prefixes, head_prefixes: where the language model's layers and LM head are.

    Returns:
        ``(decoder, {name: module with its weights}, transformers' config)``.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_safetensors`, :func:`load_module_state`,
            :func:`load_decoder` (the part is named).
    """
    from transformers import AutoConfig

    state = read_safetensors(path)
    full_cfg = AutoConfig.from_pretrained(str(path))
    modules = {}
    for name, (prefixes, make) in parts.items():
        modules[name] = make(full_cfg)
        load_module_state(modules[name], take_prefixed(state, prefixes), f"{path} ({name})")
    text_state = {**take_prefixed(state, text_prefixes, "model."), **take_prefixed(state, head_prefixes, "lm_head.")}
    return load_decoder(cfg, text_state, f"{path} (language model)"), modules, full_cfg


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Decoder, ChatTokenizer | None]:
    """Read a text-only HF checkpoint folder into a :class:`Decoder` (+ tokenizer when present).

    Args:
        path: folder with ``config.json`` and one or more ``.safetensors`` shards.
        dtype: parameter dtype.

    Returns:
        ``(decoder, tokenizer or None)``.

    Raises:
        FileNotFoundError: missing folder, config or weights.
        ValueError: unsupported architecture, RoPE scaling, or missing/unexpected tensors.
    """
    path = Path(path)
    hf = read_config(path)
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (need one of {sorted(_ARCHS)})")
    if (hf.get("rope_scaling") or {}).get("mrope_section"):
        raise ValueError(f"{path}: RoPE scaling {hf['rope_scaling']} is not supported for a text-only model")
    decoder = load_decoder(decoder_config(hf, _ARCHS[arch]), read_safetensors(path), str(path)).to(dtype)
    tokenizer = ChatTokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return decoder, tokenizer
