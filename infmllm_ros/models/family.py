"""The model-family interface: what a vision-language model gives a stream session.

A family (the embedded EfficientNet + SmolLM2 demo, Qwen2.5-VL, SmolVLM2, ...) is one subclass
of :class:`VisionLanguageModel`. It brings

* a :class:`~infmllm_ros.models.Decoder` (ours: the KV cache and its scoring live there) and a
  :class:`~infmllm_ros.models.ChatTokenizer` (the family's chat template and stop tokens);
* :meth:`VisionLanguageModel.encode_frame`: an RGB frame -> vision embeddings in the decoder's
  input space, plus a small summary vector that the session's novelty gate compares. It runs in
  three steps that a family implements: :meth:`~VisionLanguageModel.vision_inputs` (the
  family's image processor), :meth:`~VisionLanguageModel.vision_tower` (the tower and its
  projector as one ``torch.nn.Module`` of pixel tensors: what a vision engine is exported from,
  :mod:`infmllm_ros.engines.onnx_export`) and :meth:`~VisionLanguageModel.frame_encoding`;
* the layout of a frame chunk: the family's own image markers around the vision tokens
  (``<|vision_start|>`` ... ``<|vision_end|>`` for Qwen2-VL, ``<fake_token_around_image>
  <global-img>`` ... for SmolVLM), inside a user turn of its chat template;
* the RoPE positions of that chunk (:meth:`VisionLanguageModel.chunk_positions`: None for 1-D
  RoPE; ``[3, n]`` (t, h, w) for M-RoPE).

The session owns the rest (tag text, novelty gate, cache, questions), so the same streaming
runtime serves every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import torch

from .decoder import Decoder
from .tokenizer import ChatTokenizer
from .vision import check_rgb

#: A vision engine as :meth:`VisionLanguageModel.encode_frame` calls it: pixel tensors in, the
#: tower's outputs out; ``frame_size`` ``(width, height)`` px that frames are resized to first,
#: or None when the family's processor already fixes the pixel shape.
VisionRunner = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class FrameEncoding:
    """One frame through a family's vision tower and projector.

    Attributes:
        embeds: vision tokens in the decoder's input space, ``[n, hidden]``, decoder dtype.
        summary: fp32 ``[C]`` vector the novelty gate compares (class probabilities for the
            embedded family, mean vision token otherwise; see :attr:`VisionLanguageModel.novelty_metric`).
        label: what the frame shows in words ("domestic cat"), "" when the family does not name it.
        grid: ``(h, w)`` of the vision tokens as the decoder lays them out (M-RoPE), ``h * w = n``.
        deepstack: a DeepStack family's features for its first decoder layers, each ``[n, hidden]``
            (Qwen3-VL), empty otherwise.
    """

    embeds: torch.Tensor
    summary: torch.Tensor
    label: str = ""
    grid: tuple[int, int] = (1, 1)
    deepstack: tuple[torch.Tensor, ...] = ()


@dataclass(frozen=True)
class VisionInputs:
    """One frame as its family's vision tower reads it.

    Attributes:
        pixels: the tower's input tensors (e.g. ``[patches, C*T*P*P]`` for Qwen2-VL,
            ``[1, 3, S, S]`` for SmolVLM), in the tower's dtype and device.
        grid: ``(h, w)`` of the frame's vision tokens (M-RoPE layout), ``h * w`` tokens.
        mask: SmolVLM's patch mask ``[1, S/p, S/p]`` bool when part of the image is padding,
            else None.
    """

    pixels: tuple[torch.Tensor, ...]
    grid: tuple[int, int] = (1, 1)
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class FrameChunk:
    """The tokens of one stored frame, in cache order: ``before`` ids, ``vision`` embeddings, ``after`` ids.

    Attributes:
        before: token ids ahead of the vision tokens (turn opening, frame tag, image marker).
        vision: ``[m, hidden]`` vision embeddings, or None for a familiar frame (text only).
        after: token ids behind them (closing marker, end of turn).
        mrope: int64 ``[3, n]`` (t, h, w) positions relative to the chunk start, or None (1-D).
        deepstack: ``[layers, m, hidden]`` DeepStack features of the vision tokens, or None.
    """

    before: list[int]
    vision: torch.Tensor | None
    after: list[int]
    mrope: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None

    def deepstack_inputs(self) -> torch.Tensor | None:
        """The DeepStack features over the whole chunk, ``[layers, len(self), hidden]`` (zeros at
        the text tokens; what :meth:`Decoder.forward` adds), or None."""
        if self.deepstack is None:
            return None
        layers, m, hidden = self.deepstack.shape
        full = self.deepstack.new_zeros(layers, len(self), hidden)
        full[:, len(self.before) : len(self.before) + m] = self.deepstack
        return full

    @property
    def vision_tokens(self) -> int:
        """Vision tokens in the chunk."""
        return 0 if self.vision is None else self.vision.shape[0]

    def __len__(self) -> int:
        return len(self.before) + self.vision_tokens + len(self.after)

    def ids(self, placeholder: int) -> list[int]:
        """The chunk as token ids with ``placeholder`` (the family's image token) at vision slots:
        what a ``transformers`` processor would feed the reference model."""
        return self.before + [placeholder] * self.vision_tokens + self.after


class VisionLanguageModel:
    """A decoder, its tokenizer and a vision front end, as a stream session uses them.

    Subclasses set the class attributes and implement :meth:`encode_frame`; an M-RoPE family
    also overrides :meth:`chunk_positions`.

    Args:
        decoder, tokenizer: the language model.
        name: names the weights (engine file names, reports).
        max_vision_tokens: most vision tokens one frame yields (sizes the session's chunks).

    Attributes:
        family: registry name (``models.registry.FAMILIES``).
        image_token_id: the placeholder id of a vision token in the family's vocabulary (None
            when it has none: the embedded demo).
        novelty_metric: how frame summaries are compared: ``"total_variation"`` (probabilities)
            or ``"cosine"`` (feature vectors); novelty_threshold: the gate's default.
        novel_text / familiar_text: text after the frame tag, before the vision tokens of a new
            frame / alone for a familiar one.
        image_open / image_close: the family's marker text around the vision tokens.
    """

    family: ClassVar[str] = "base"
    novelty_metric: ClassVar[str] = "cosine"
    novelty_threshold: ClassVar[float] = 0.6
    novel_text: ClassVar[str] = ""
    familiar_text: ClassVar[str] = " Nothing new."
    image_open: ClassVar[str] = ""
    image_close: ClassVar[str] = ""
    image_token_id: int | None = None
    #: The tower's export runs the TorchScript tracer (``torch.onnx.export(dynamo=False)``), not
    #: the dynamo exporter: its forward loops in Python over the image grid's values (Qwen2-VL's
    #: rotary positions and window indices from ``grid_thw.tolist()``), which ``torch.export``
    #: cannot trace as data; at one fixed frame size the tracer records them as constants.
    vision_traced: ClassVar[bool] = False
    #: The weight files the model was loaded from (a GGUF file or an HF folder), set by
    #: :func:`~.registry.load_model`; engines record their digest.
    checkpoint: Path | None = None

    def __init__(self, decoder: Decoder, tokenizer: ChatTokenizer, name: str, max_vision_tokens: int):
        self.decoder, self.tokenizer, self.name = decoder, tokenizer, name
        self.max_vision_tokens = max_vision_tokens
        self._turn_prefix, self._turn_suffix = tokenizer.render_turn("user", "\0").split("\0")

    @property
    def device(self) -> torch.device:
        """Where the decoder's weights live."""
        return next(self.decoder.parameters()).device

    def label_concepts(self, label: str) -> frozenset[str] | None:
        """The words a frame label *is* (its own and every more general noun: "domestic cat" ->
        cat, feline, animal, ...), lower-case; None when the family's labels carry no such
        knowledge (the answer's verdict then rests on the match score alone)."""
        return None

    @torch.inference_mode()
    def encode_frame(self, rgb: np.ndarray, vision: VisionRunner | None = None) -> FrameEncoding:
        """Vision tokens and summary of a uint8 RGB frame ``[H, W, 3]`` (or float in [0, 1]).

        Args:
            rgb: the frame.
            vision: a vision engine to run instead of the torch tower (:data:`VisionRunner`);
                a frame of another size than its ``frame_size`` is first resized to it.

        Raises:
            TypeError / ValueError: a frame the family's preprocessing cannot take
                (:func:`~infmllm_ros.models.vision.check_rgb`).
        """
        rgb = check_rgb(rgb)
        size = getattr(vision, "frame_size", None)
        if size is not None and (rgb.shape[1], rgb.shape[0]) != tuple(size):
            rgb = cv2.resize(rgb, tuple(size), interpolation=cv2.INTER_AREA)
        inputs = self.vision_inputs(rgb)
        out = vision(*inputs.pixels) if vision is not None else self.vision_tower(inputs)(*inputs.pixels)
        return self.frame_encoding(out if isinstance(out, tuple) else (out,), inputs)

    @property
    def engine_frame_size(self) -> tuple[int, int] | None:
        """``(width, height)`` px a vision engine is built for, frames resized to it; None when
        the family's processor gives one pixel shape for every frame (the engine takes that)."""
        return None

    def vision_inputs(self, rgb: np.ndarray) -> VisionInputs:
        """The family's image processor on a checked uint8 RGB frame ``[H, W, 3]``.

        Raises:
            ValueError: a frame the processor cannot take.
        """
        raise NotImplementedError

    def vision_tower(self, inputs: VisionInputs) -> torch.nn.Module:
        """The vision tower and projector for frames shaped like ``inputs``, as one module whose
        forward takes ``*inputs.pixels`` and returns the tensor(s) :meth:`frame_encoding` reads
        (what a vision engine is exported from; weights shared, not copied).

        Raises:
            NotImplementedError: the family has no tower module (it overrides :meth:`encode_frame`
                alone): it runs on the torch backend only.
        """
        raise NotImplementedError(
            f"the {self.family} family has no vision tower to export as an engine; use backend torch"
        )

    def frame_encoding(self, outputs: tuple[torch.Tensor, ...], inputs: VisionInputs) -> FrameEncoding:
        """The :class:`FrameEncoding` of the tower's ``outputs`` for a frame's ``inputs``: by default
        the first output is the vision tokens ``[n, hidden]`` (summary: their mean, laid out as
        ``inputs.grid``) and any further ones are DeepStack features (Qwen3-VL)."""
        dtype = next(self.decoder.parameters()).dtype
        embeds = outputs[0].to(dtype)
        return FrameEncoding(embeds, embeds.float().mean(0), "", inputs.grid, tuple(o.to(dtype) for o in outputs[1:]))

    def frame_chunk(self, tag: str, frame: FrameEncoding | None) -> FrameChunk:
        """The chunk of a stored frame as a user turn: ``tag`` + :attr:`novel_text` + the image
        between the family's markers, or ``tag`` + :attr:`familiar_text` when ``frame`` is None."""
        # each run of text between the vision tokens is encoded in one pass, as the template's text
        enc, prefix, suffix = self.tokenizer.encode, self._turn_prefix, self._turn_suffix
        if frame is None:
            return FrameChunk(enc(prefix + tag + self.familiar_text + suffix), None, [])
        before = enc(prefix + tag + self.novel_text + self.image_open)
        after = enc(self.image_close + suffix)
        deepstack = torch.stack(frame.deepstack) if frame.deepstack else None
        return FrameChunk(before, frame.embeds, after, self.chunk_positions(len(before), frame, len(after)), deepstack)

    def chunk_positions(self, n_before: int, frame: FrameEncoding, n_after: int) -> torch.Tensor | None:
        """RoPE positions of a frame chunk relative to its start: None for 1-D RoPE (the tokens
        take consecutive positions), int64 ``[3, n]`` for M-RoPE."""
        return None
