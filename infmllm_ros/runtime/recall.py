"""Sightings: which frames still in the KV cache match a question, and when they were seen.

The 135M language model names what it saw but never states when (bench/results/README.md,
"Answers"). The cache knows: every vision slot carries its frame id and stamp. A question's
tokens, once prefilled, have value vectors in the cache beside the frames' vision tokens, and
at a late layer a question word and a frame showing that object have similar values (the
vision tokens are class-name embeddings, :class:`~infmllm_ros.models.vision.LabelEmbeddingProjector`).

Score of frame ``f`` for question tokens ``q`` at layer ``l``: for each question token, the
cosine similarity of its value to the best-matching value among ``f``'s vision slots (any KV
head), minus that token's mean over the frames in context (so tokens like "a" or "?" that match
every frame alike count for nothing); the frame's score is the largest over question tokens.
Only what the eviction policy kept can be found: an evicted frame has no slots to match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kvcache import KVCache, SlotKind
from .pose import Pose

#: Relative depth of the layer whose values are matched: layer 23 of SmolLM2-135M's 30, the best
#: single layer on full-cache needle drives (chosen on one, held out on another; what it recalls:
#: bench/results/README.md, "Camera memory"). Other families take the same relative depth, not
#: yet measured on their real weights.
RECALL_DEPTH = 23 / 30


def default_recall_layer(num_layers: int) -> int:
    """The default recall layer of a ``num_layers``-layer decoder, counted from the top
    (negative): ``-7`` for SmolLM2's 30 layers (:data:`RECALL_DEPTH`)."""
    return -max(1, num_layers - round(RECALL_DEPTH * num_layers))


@dataclass(frozen=True)
class Sighting:
    """A frame in the cache that matches the question.

    Attributes:
        frame_id: the frame's index in the stream. stamp_s: its time (seconds).
        score: contrast in cosine units (0 = no better than the average frame in context).
        camera: the camera that saw it ("" when not known).
        pose: where the robot was (:class:`~.pose.Pose`; None when not known).
    """

    frame_id: int
    stamp_s: float
    score: float
    camera: str = ""
    pose: Pose | None = None


#: Best-sighting score at or above which the question's object counts as seen, and the width
#: (score units) of the logistic that turns the score into a confidence. Fitted by
#: ``infmllm-bench-calibrate`` on 5-minute needle drives of seeds 0-2 (present vs absent objects,
#: embedded model, inf_mllm@1024) and reported on seeds 3-5: bench/results/seen_calibration.*.
SEEN_THRESHOLD = 0.24
SEEN_SCALE = 0.1


def with_article(noun: str) -> str:
    """``noun`` with its indefinite article: "a domestic cat", "an espresso", "an astronaut"
    (by the first letter; "a" before a consonant letter)."""
    noun = noun.strip()
    return ("an " if noun[:1].lower() in "aeiou" and noun else "a ") + noun


def judge(
    sightings: list[Sighting], threshold: float = SEEN_THRESHOLD, scale: float = SEEN_SCALE
) -> tuple[bool, float]:
    """``(seen, confidence)`` for a question from its sightings (best first).

    ``confidence = 1 / (1 + exp(-(best_score - threshold) / scale))`` in (0, 1), 0 without any
    sighting; ``seen = confidence >= 0.5`` (the best score reaches ``threshold``). With one frame
    of vision tokens in context its contrast is 0 by definition and says nothing: ``seen`` is
    False and ``confidence`` 0.5 (undecided, :class:`.answer.Verdict`); never a yes without
    evidence.
    """
    if not sightings:
        return False, 0.0
    if len(sightings) == 1:
        return False, 0.5
    z = (sightings[0].score - threshold) / scale
    confidence = 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))
    return confidence >= 0.5, confidence


def find_sightings(cache: KVCache, query_tokens: int, layer: int, top: int = 3) -> list[Sighting]:
    """The frames in ``cache`` that best match its newest ``query_tokens`` tokens (a question).

    Args:
        cache: a cache whose last ``query_tokens`` occupied slots hold the question (just
            prefilled; every policy keeps the newest tokens).
        query_tokens: how many newest slots are the question (tokens), ``>= 1``.
        layer: decoder layer whose values are compared (negative counts from the top).
        top: most sightings returned.

    Returns:
        up to ``top`` sightings, best first; empty when no frame has vision tokens in context.

    Raises:
        ValueError: ``query_tokens`` outside ``1..cache.length``, ``layer`` out of range, or
            ``top < 1``.
    """
    layers = cache.k.shape[0]
    if not 1 <= query_tokens <= cache.length:
        raise ValueError(f"query_tokens must be in 1..{cache.length} (occupied slots), got {query_tokens}")
    if not -layers <= layer < layers:
        raise ValueError(f"layer {layer} out of range for a {layers}-layer cache")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    end = cache.length
    start = end - query_tokens
    vision = cache.kind[layer, :, :start] == SlotKind.VISION  # [kv_heads, S]
    if not bool(vision.any()):
        return []
    frames, slot_frame = torch.unique(cache.frame[layer, :, :start][vision], return_inverse=True)
    values = torch.nn.functional.normalize(cache.v[layer, :, :start].float(), dim=-1)
    query = torch.nn.functional.normalize(cache.v[layer, :, start:end].float(), dim=-1)
    sim = torch.einsum("hnd,hsd->nhs", query, values)[:, vision]  # [n, vision slots]
    per_frame = torch.full((query_tokens, frames.numel()), -2.0, device=sim.device)
    per_frame.scatter_reduce_(1, slot_frame.expand(query_tokens, -1), sim, reduce="amax")
    score = (per_frame - per_frame.mean(1, keepdim=True)).amax(0)  # [frames]
    best = score.argsort(descending=True)[:top]
    stamps = torch.zeros(frames.numel(), dtype=cache.stamp.dtype, device=cache.stamp.device)
    stamps.scatter_(0, slot_frame, cache.stamp[layer, :, :start][vision])
    return [Sighting(int(frames[i]), float(stamps[i]), float(score[i])) for i in best.tolist()]
