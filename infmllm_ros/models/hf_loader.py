"""Load a Hugging Face LLaMA / Qwen2 checkpoint folder (``config.json`` + ``*.safetensors``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .decoder import Decoder, DecoderConfig
from .tokenizer import ChatTokenizer

_ARCHS = {"LlamaForCausalLM": False, "Qwen2ForCausalLM": True}  # -> q/k/v bias


def load_hf_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32
                       ) -> tuple[Decoder, ChatTokenizer | None]:
    """Read a HF checkpoint folder into a :class:`Decoder` (+ tokenizer when present).

    Args:
        path: folder with ``config.json`` and one or more ``.safetensors`` shards.
        dtype: parameter dtype.

    Returns:
        ``(decoder, tokenizer or None)``.

    Raises:
        FileNotFoundError: missing folder, config or weights.
        ValueError: unsupported architecture, RoPE scaling, or missing/unexpected tensors.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    hf = json.loads(cfg_file.read_text())
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in _ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r} (need one of {sorted(_ARCHS)})")
    if hf.get("rope_scaling"):
        raise ValueError(f"{path}: RoPE scaling {hf['rope_scaling']} is not supported")
    n_heads = hf["num_attention_heads"]
    cfg = DecoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=n_heads, num_kv_heads=hf.get("num_key_value_heads", n_heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=_ARCHS[arch] or bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
    )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    decoder = Decoder(cfg)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = decoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected {unexpected}")
    decoder.to(dtype).eval()
    tokenizer = ChatTokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return decoder, tokenizer
