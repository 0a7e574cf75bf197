"""Load a LLaMA/Qwen2 GGUF file (weights, config, tokenizer, chat template) with the `gguf` package.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised by ``gguf.quants.dequantize`` to fp32.
LLaMA Q/K weights in GGUF are permuted for llama.cpp's interleaved RoPE; we undo the
permutation (llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``) to get the
rotate-half layout of :mod:`infmllm_ros.kvcache.rope`. Qwen2 GGUF files are not permuted.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from .decoder import Decoder, DecoderConfig
from .hf_loader import load_decoder
from .tokenizer import ChatTokenizer

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation for ``n_head`` heads (w is ``[out, in]``)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class _Reader(GGUFReader):
    """``gguf.GGUFReader`` that reads the metadata fields from a plain ndarray view of the mapping.

    The reader slices its ``np.memmap`` twice per string of an array field, and every slice of a
    memmap runs numpy's Python-level memmap hooks: for SmolLM2's 49,152-token vocabulary and its
    merges that was two thirds of the reader's time (1.7 s here; 0.6 s over the view). The
    fields hold the same values (``test/test_models.py``); the tensors still view the memmap.
    """

    def _build_fields(self, offs: int, count: int) -> int:
        mapped = self.data
        self.data = mapped.view(np.ndarray)
        try:
            return super()._build_fields(offs, count)
        finally:
            self.data = mapped


@functools.lru_cache(maxsize=1)
def _reader(path: str, size: int, mtime_ns: int):
    """The file's :class:`_Reader`, kept for the next load of the same file (same
    size and modification time): a node that is cleaned up and configured again, or a tool run
    twice in one process, skips gguf's parsing of every metadata field. The reader maps the file
    and holds no weights."""
    return _Reader(path)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Decoder, ChatTokenizer]:
    """Read a GGUF file into a :class:`Decoder` and its :class:`ChatTokenizer`.

    Args:
        path: ``.gguf`` file (architecture ``llama`` or ``qwen2``).
        dtype: parameter dtype after dequantisation.

    Returns:
        ``(decoder, tokenizer)``; the decoder is in eval mode.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a GGUF file, an unsupported architecture, or missing tensors.
    """
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    stat = path.stat()
    try:
        reader = _reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except Exception as exc:  # gguf raises ValueError/struct.error/... for non-GGUF bytes
        raise ValueError(f"{path} is not a readable GGUF file: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (need llama or qwen2)")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    cfg = DecoderConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=n_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
    )
    state = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        m = _BLOCK.match(t.name)
        if m:
            layer, part, kind = m.groups()
            if part not in _LAYER_NAMES:
                raise ValueError(f"{path}: unexpected tensor {t.name}")
            if arch == "llama" and part in ("attn_q", "attn_k"):
                w = _unpermute(w, n_heads if part == "attn_q" else cfg.num_kv_heads)
            state[f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"] = torch.from_numpy(w.copy())
        elif t.name in _GLOBAL_NAMES:
            state[_GLOBAL_NAMES[t.name]] = torch.from_numpy(w.copy())
    decoder = load_decoder(cfg, state, str(path)).to(dtype)
    tokenizer = ChatTokenizer.from_bpe(
        tokens=tokens,
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        token_types=list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 0)),
        chat_template=_field(reader, "tokenizer.chat_template", "") or "",
        pre=_field(reader, "tokenizer.ggml.pre", "gpt2"),
    )
    return decoder, tokenizer
