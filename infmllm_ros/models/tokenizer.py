"""Tokenizer + chat template for the language model, on the `tokenizers` library and Jinja2.

The byte-level BPE is built by `tokenizers` from the vocabulary and merges stored in a GGUF
file (``tokenizer.ggml.*``) or loaded from a Hugging Face ``tokenizer.json``; the chat template
is the model's own Jinja template, rendered in a sandbox as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# GGUF token_type values (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_SPECIAL_TOKEN_TYPES = (3, 4)


def split_trailing_space(text: str) -> tuple[str, str]:
    """``text`` without its trailing spaces, and those spaces: a byte-level BPE attaches a space
    to the word after it (``" What"``), so text that follows is encoded with them."""
    core = text.rstrip(" ")
    return core, text[len(core) :]


class ChatTokenizer:
    """Text <-> token ids, plus the chat template and stop tokens.

    Args:
        tokenizer: a `tokenizers.Tokenizer`.
        chat_template: Jinja chat template (``messages`` -> prompt text).
        eos_id: end-of-sequence token id.
        extra_stop: other token strings that end a reply (e.g. ``<|im_end|>``).

    Raises:
        ValueError: if a stop token is not in the vocabulary.
    """

    def __init__(
        self, tokenizer: Tokenizer, chat_template: str, eos_id: int, extra_stop: tuple[str, ...] = ("<|im_end|>",)
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_id = eos_id
        stops = {eos_id}
        for tok in extra_stop:
            tid = tokenizer.token_to_id(tok)
            if tid is not None:
                stops.add(tid)
        self.stop_ids = frozenset(stops)
        # A copy that reads special-token strings as plain characters, for operator text.
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._template = (
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
            if chat_template
            else None
        )
        # VLM templates (SmolVLM's) iterate a message's content as typed parts; others take a string.
        self._content_parts = False
        if self._template is not None:
            probe = [{"role": "user", "content": "\x01probe"}]
            try:
                self._content_parts = "\x01probe" not in self.render_chat(probe, add_generation_prompt=False)
            except Exception:  # noqa: BLE001 - any template error on a string content means parts
                self._content_parts = True

    @property
    def turn_end_id(self) -> int:
        """The token that closes a chat turn (``<|im_end|>``, ``<end_of_utterance>``): the first
        token of a rendered turn's ending when it is a stop token, else ``eos_id``."""
        if self._template is not None:
            suffix = self.render_turn("user", "\0").split("\0")[1]
            ids = self.encode(suffix)
            if ids and ids[0] in self.stop_ids:
                return ids[0]
        return self.eos_id

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including special tokens."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings in the text are recognised): for text
        the program writes (templates, tags, memory lines)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings (``<|im_end|>``, ``<image>``) read as
        the characters they are: for text an operator writes, which must never become chat
        structure or an image marker."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens removed, ending at a character boundary: a
        byte-level token can end inside a UTF-8 character (a CJK character is often two or three
        tokens), which decodes to U+FFFD; an answer cut at its token limit, and each partial
        answer streamed, drop that incomplete character instead of showing the replacement."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Prompt text for ``messages`` (``[{"role": ..., "content": ...}]``) by the chat template.

        Raises:
            ValueError: if the model has no chat template.
        """
        if self._template is None:
            raise ValueError("this model has no chat template")
        if self._content_parts:
            messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token="",
            eos_token=self.tokenizer.id_to_token(self.eos_id),
        )

    def render_turn(self, role: str, content: str, add_generation_prompt: bool = False) -> str:
        """Prompt text of one more turn in an ongoing chat (no default system prompt injected).

        Templates such as SmolLM2's insert their own system prompt when the first message is not
        a system message; a streaming session appends turns one at a time, so the turn is rendered
        after a placeholder system message and that prefix is cut off.

        Raises:
            ValueError: no chat template, or a template whose output does not extend its prefix.
        """
        head = [{"role": "system", "content": "-"}]
        prefix = self.render_chat(head, add_generation_prompt=False)
        full = self.render_chat(head + [{"role": role, "content": content}], add_generation_prompt)
        if not full.startswith(prefix):
            raise ValueError("chat template does not render turns incrementally")
        return full[len(prefix) :]

    @classmethod
    def from_bpe(
        cls,
        tokens: list[str],
        merges: list[str],
        token_types: list[int],
        eos_id: int,
        chat_template: str,
        pre: str = "gpt2",
    ) -> ChatTokenizer:
        """Byte-level BPE from GGUF-style vocab/merges.

        Args:
            tokens: vocabulary, index = id.
            merges: ``"a b"`` merge rules in priority order.
            token_types: GGUF token types; control/user-defined tokens become special tokens.
            pre: llama.cpp pre-tokenizer name; ``smollm`` splits digits individually first.
        """
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t, ty in zip(tokens, token_types) if ty in _SPECIAL_TOKEN_TYPES])
        return cls(tok, chat_template, eos_id)

    @classmethod
    def from_hf_dir(cls, path: str | Path, extra_stop: tuple[str, ...] = ("<|im_end|>",)) -> ChatTokenizer:
        """From a Hugging Face checkpoint folder: ``tokenizer.json``, the chat template (in
        ``tokenizer_config.json``, ``chat_template.jinja`` or ``chat_template.json``), and stop
        tokens from ``tokenizer_config.json``'s ``eos_token``, ``generation_config.json``'s
        ``eos_token_id`` and ``extra_stop``.

        Raises:
            FileNotFoundError: if ``tokenizer.json`` is missing (the message names it).
        """
        path = Path(path)
        tjson = path / "tokenizer.json"
        if not tjson.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        tok = Tokenizer.from_file(str(tjson))

        def read(name: str) -> dict:
            f = path / name
            return json.loads(f.read_text()) if f.is_file() else {}

        cfg = read("tokenizer_config.json")
        template = cfg.get("chat_template") or read("chat_template.json").get("chat_template") or ""
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eos = cfg.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        eos_id = tok.token_to_id(eos) if eos else None
        gen_eos = read("generation_config.json").get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos_id is None and gen_eos:
            eos_id = gen_eos[0]
        extra = tuple(extra_stop) + tuple(t for t in (tok.id_to_token(i) for i in gen_eos) if t)
        return cls(tok, template, eos_id if eos_id is not None else 0, extra_stop=extra)
