"""StreamSession: one camera stream's memory in a fixed-size KV cache, and questions about it.

The session runs any model family (:class:`~infmllm_ros.models.family.VisionLanguageModel`).
The stream in the cache is: the system prompt (protected sinks), then one chunk per stored
frame, then chat turns. A frame that shows something new (:class:`.novelty.SceneNovelty`) is
stored as a user turn ``<frame t=12.0s cam=front>`` + the family's image markers and vision
tokens; a frame like the scene before it as
``<frame t=13.0s cam=front> Nothing new.``, which costs fewer slots and leaves the new things
as the only objects the LM reads about, and only once per ``familiar_interval_s`` per camera
(a heartbeat that keeps the clock in the cache): the familiar frames in between update the
scene and cost the vision encoder only. Frames and
questions take one lock around the cache, so one ingest thread and one ask thread can share a
session; the vision encoder runs outside the lock, so ingest of the next frame overlaps decoding
only in its vision part.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from ..kvcache import SlotKind, make_policy
from ..kvcache.policies import DEFAULT_SLACK, MEMORY_BETA, MEMORY_DECAY, MEMORY_VISION_BUDGET, scores_slots
from ..models.family import FrameChunk, FrameEncoding, VisionLanguageModel
from ..models.tokenizer import split_trailing_space
from ..models.vision import check_rgb
from .answer import DEFAULT_NEAR_RADIUS_M, AnswerTemplate, FrameNote, Verdict, template_for
from .backends import Backend, TorchBackend, make_backend
from .generate import Sampling, decode
from .memory_file import load_memory, save_memory
from .novelty import SceneNovelty
from .pose import Pose
from .recall import SEEN_THRESHOLD, Sighting, default_recall_layer, find_sightings, judge

#: Seconds between stored familiar frames ("Nothing new.") of a camera. Storing every familiar
#: frame spends a chunk's prefill and its slots on the same sentence; one a 10 s is enough to
#: keep the clock in the cache (bench/results/README.md, "Camera memory" and "Ingest and decode
#: cost").
DEFAULT_FAMILIAR_INTERVAL_S = 10.0

#: Decoding defaults: greedy, with the two repetition controls set so that an answer cannot loop
#: (no 4-gram twice; a mild penalty on the answer's own tokens). Plain greedy answered "I'm
#: sorry for any confusion." seven times in a row on the demo drive.
DEFAULT_SAMPLING = Sampling(repetition_penalty=1.1, no_repeat_ngram_size=4)

#: A question of at most this many words is answered with one sentence: decoding stops at the
#: first sentence end.
DEFAULT_SENTENCE_STOP_WORDS = 16

#: Sightings rendered into the answer prompt: the best one, as one plain sentence a small
#: model can repeat (a list of several read worse to SmolLM2-135M).
DEFAULT_EVIDENCE_SIGHTINGS = 1

#: Longest question taken, in tokens (about 200 English words).
DEFAULT_MAX_QUESTION_TOKENS = 256
#: Most tokens one answer may generate (the node's ``max_new_tokens`` and ``Ask.max_new_tokens``).
MAX_NEW_TOKENS_LIMIT = 1024
#: The per-frame record (camera, label, pose) of a frame the session has none of.
UNKNOWN_FRAME = ("", "", None)

#: Thumbnail size (width, height) kept per stored frame for ``memory_frames``, and how many
#: stored frames may accumulate before the per-frame records (camera, label, thumbnail) of
#: frames that left the cache are dropped.
THUMBNAIL_SIZE = (96, 72)
THUMBNAIL_PRUNE_EVERY = 32


@dataclass(frozen=True)
class MemoryFrame:
    """A frame that still holds KV slots: ``frame_id``, ``stamp_s`` (stream seconds), ``camera``,
    ``label`` ("" for a familiar frame), ``slots`` (mean slots per (layer, KV head) row),
    ``thumbnail`` (uint8 RGB ``[72, 96, 3]``, None for a frame loaded from a memory file) and
    ``pose`` (where the robot was, :mod:`.pose`; None when unknown)."""

    frame_id: int
    stamp_s: float
    camera: str
    label: str
    slots: float
    thumbnail: np.ndarray | None
    pose: Pose | None = None


@dataclass(frozen=True)
class FrameResult:
    """What ingesting one frame did. Times in milliseconds, counts in tokens; ``top_label`` what
    the family names in the frame ("" when it names nothing); ``novelty`` in
    [0, 1] and ``novel`` from :class:`SceneNovelty` (a familiar frame carries no vision tokens);
    ``stored`` False for a familiar frame inside the camera's ``familiar_interval_s`` (then
    ``tokens`` is 0 and ``prefill_ms`` only the bookkeeping)."""

    frame_id: int
    tokens: int
    top_label: str
    vision_ms: float
    prefill_ms: float
    evicted_tokens: int
    novelty: float
    novel: bool
    stored: bool = True


class QuestionTooLong(ValueError):
    """A question over :attr:`AnswerSettings.max_question_tokens` tokens, refused before any work."""


class Stopped(enum.StrEnum):
    """Why an answer ended before its end of turn (``Answer.stopped``, and the ROS ``Answer``'s
    ``stopped`` field). ``""``: it did not; the text is whole."""

    NONE = ""
    DEADLINE = "deadline"  # the deadline passed; the text is partial
    CANCELLED = "cancelled"  # the caller cancelled; the stream is as it was before the question
    SHUTDOWN = "shutdown"  # the node's own cancel at SIGINT (set by the node, never the session)


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are shaped, replaced whole while the stream runs (``ros2 param set answer.*``).

    Attributes:
        sampling: default decoding (:class:`.generate.Sampling`).
        sentence_stop_words: a question of at most this many words is answered up to the end of
            the first sentence (0: off).
        evidence_sightings: most sightings rendered into the answer prompt (0: no evidence line).
        seen_threshold: best-sighting score at which an object counts as seen.
        max_question_tokens: longest question taken (tokens); a longer one is refused before any
            work (it would hold the model while it prefills and stay in context).
        near_radius_m: radius (metres) of "What did you see near (x, y)?".

    Raises:
        ValueError: a value outside its range (the message names it).
    """

    sampling: Sampling = DEFAULT_SAMPLING
    sentence_stop_words: int = DEFAULT_SENTENCE_STOP_WORDS
    evidence_sightings: int = DEFAULT_EVIDENCE_SIGHTINGS
    seen_threshold: float = SEEN_THRESHOLD
    max_question_tokens: int = DEFAULT_MAX_QUESTION_TOKENS
    near_radius_m: float = DEFAULT_NEAR_RADIUS_M

    def __post_init__(self):
        if self.sentence_stop_words < 0 or self.evidence_sightings < 0:
            raise ValueError(
                f"sentence_stop_words ({self.sentence_stop_words}) and evidence_sightings "
                f"({self.evidence_sightings}) must be >= 0"
            )
        if not math.isfinite(self.seen_threshold):
            raise ValueError(f"seen_threshold must be finite, got {self.seen_threshold}")
        if self.max_question_tokens < 1:
            raise ValueError(f"max_question_tokens must be >= 1, got {self.max_question_tokens}")
        if not (math.isfinite(self.near_radius_m) and self.near_radius_m > 0):
            raise ValueError(f"near_radius_m must be a finite number of metres > 0, got {self.near_radius_m}")


@dataclass(frozen=True)
class Answer:
    """An answer and the state it was answered from.

    Attributes:
        text: the reply. latency_s: wall time of the whole ask (seconds).
        ttft_s: time to the first generated token (prompt prefill + first step, seconds).
        decode_tokens_per_s: generated tokens per second after the first.
        new_tokens: generated tokens. tokens_in_cache: occupied slots per row after answering.
        frames_in_context: frames with at least one token in the cache.
        first_frame_s / last_frame_s: stamps (seconds) of the oldest / newest frame in context
            (NaN when none).
        sightings: the frames in context that best match the question, best first
            (:func:`.recall.find_sightings`): when the answer's object was seen.
        token_ids: the generated token ids (without the stop token).
        seen, confidence: whether the question's object is in the cached frames (the verdict is
            "seen"), and how sure, in [0, 1] (:func:`.recall.judge`; 0.5 when undecided).
        verdict: "seen", "not seen" or "undecided" (:func:`.answer.verdict`).
        evidence: the memory line rendered into the answer prompt ("Memory: I saw a domestic
            cat at t=60 s."), so the answer can say when (:meth:`.answer.AnswerTemplate.evidence`).
        answer_source: "model" (the generated text) or "evidence" (the text contradicted the
            evidence and was replaced by the evidence sentence; :meth:`.answer.AnswerTemplate.settle`).
        problems: how the generated text contradicted the evidence (empty when it did not).
        stopped: "" when the answer ended by itself (stop token, sentence end, token budget);
            "deadline" or "cancelled" when it was cut there and is partial.
    """

    text: str
    latency_s: float
    ttft_s: float
    decode_tokens_per_s: float
    new_tokens: int
    tokens_in_cache: int
    frames_in_context: int
    first_frame_s: float
    last_frame_s: float
    sightings: tuple[Sighting, ...] = ()
    token_ids: tuple[int, ...] = ()
    seen: bool = False
    confidence: float = 0.0
    evidence: str = ""
    stopped: Stopped = Stopped.NONE
    verdict: str = Verdict.NOT_SEEN.value
    answer_source: str = "model"
    problems: tuple[str, ...] = ()


class StreamSession:
    """Frames in, questions answered, memory bounded by the KV-cache capacity.

    Args:
        model: the model family instance (decoder, tokenizer, vision front end; :func:`load_model`).
        capacity: KV slots (tokens) kept. policy: policy name (:data:`kvcache.POLICIES`).
        recent: protected newest tokens. beta, decay: inf_mllm attention bias and score carry.
        max_chunk: largest chunk (tokens); the buffer has ``capacity + slack + max_chunk`` slots.
            None: 64, or room for the model's largest frame (its vision tokens + 48 tokens of text).
        slack: tokens appended past ``capacity`` before an eviction runs (lazy eviction,
            :class:`~infmllm_ros.kvcache.KVCache`; 0: evict whenever a chunk overflows).
        system_prompt: the stream's first chunk (None: the family template's). sinks: how many of its leading tokens are
            protected sinks (default: all of them; StreamingLLM keeps 4).
        backend: how chunks run (:mod:`.backends`); default the torch decoder.
        vision_budget: VISION slots per row kept ahead of other saddles (tokens; only for
            policies that score slots, h2o and inf_mllm; :mod:`~infmllm_ros.kvcache.policies`).
            None: :data:`MEMORY_VISION_BUDGET` for those policies, 0 for the others.
        novelty_threshold, background_decay: the :class:`SceneNovelty` gate (threshold 0: every
            frame keeps its vision tokens; None: the family's default).
        familiar_interval_s: seconds between stored familiar frames of a camera (0: store every
            frame). Novel frames are always stored.
        recall_layer: decoder layer whose values find the sightings of a question (negative
            counts from the top; None: :func:`.recall.default_recall_layer`).
        sampling, sentence_stop_words, evidence_sightings, seen_threshold, max_question_tokens,
            near_radius_m: how answers are shaped, held as :attr:`answer_settings`
            (:class:`AnswerSettings` says what each is; replace it whole to change them).
        template: how questions are put and answers checked (:mod:`.answer`; None: the family's,
            :func:`.answer.template_for`).
        track_positions: frames are given the robot's pose (:meth:`ingest_frame`'s ``pose``,
            :meth:`set_frame_pose`), so an answer states where, or that the position is unknown.

    Raises:
        ValueError: bad sizes or policy (see :class:`KVCache`; the system prompt's tokens are
            sinks by default, so they count against the capacity), ``sinks`` outside 1..its length,
            a backend built for another
            model or cache size, a novelty setting, a negative ``familiar_interval_s`` or
            ``recall_layer`` out of range; a vision budget for an unscored policy or one that
            does not fit the capacity.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        capacity: int = 1024,
        policy: str = "inf_mllm",
        recent: int = 256,
        beta: float = MEMORY_BETA,
        decay: float = MEMORY_DECAY,
        max_chunk: int | None = None,
        system_prompt: str | None = None,
        sinks: int | None = None,
        backend: Backend | None = None,
        novelty_threshold: float | None = None,
        background_decay: float = 0.7,
        recall_layer: int | None = None,
        vision_budget: int | None = None,
        familiar_interval_s: float = DEFAULT_FAMILIAR_INTERVAL_S,
        sampling: Sampling = DEFAULT_SAMPLING,
        sentence_stop_words: int = DEFAULT_SENTENCE_STOP_WORDS,
        evidence_sightings: int = DEFAULT_EVIDENCE_SIGHTINGS,
        seen_threshold: float = SEEN_THRESHOLD,
        max_question_tokens: int = DEFAULT_MAX_QUESTION_TOKENS,
        slack: int = DEFAULT_SLACK,
        template: AnswerTemplate | None = None,
        track_positions: bool = False,
        near_radius_m: float = DEFAULT_NEAR_RADIUS_M,
    ):
        decoder, tokenizer = model.decoder, model.tokenizer
        if max_chunk is None:
            max_chunk = max(64, model.max_vision_tokens + 48)
        if novelty_threshold is None:
            novelty_threshold = model.novelty_threshold
        layers = decoder.cfg.num_layers
        if recall_layer is None:
            recall_layer = default_recall_layer(layers)
        if not -layers <= recall_layer < layers:
            raise ValueError(f"recall_layer {recall_layer} out of range for a {layers}-layer model")
        if not familiar_interval_s >= 0:
            raise ValueError(f"familiar_interval_s must be >= 0 seconds, got {familiar_interval_s}")
        self.answer_settings = AnswerSettings(
            sampling, sentence_stop_words, evidence_sightings, seen_threshold, max_question_tokens, float(near_radius_m)
        )
        self.track_positions = bool(track_positions)
        self.familiar_interval_s = float(familiar_interval_s)
        self.recall_layer = recall_layer
        self.model, self.tokenizer = model, tokenizer
        self.scene = SceneNovelty(novelty_threshold, background_decay, model.novelty_metric)
        self.backend = backend or TorchBackend(decoder)
        self.template = template or template_for(model.family)
        system_text = tokenizer.render_chat(
            [{"role": "system", "content": system_prompt or self.template.system_prompt}], add_generation_prompt=False
        )
        self._system_ids = tokenizer.encode(system_text)
        self._tag_ban = tuple(sorted({tuple(tokenizer.encode(text)) for text in self.template.banned_openings()}))
        if sinks is None:
            sinks = len(self._system_ids)
        if not 1 <= sinks <= len(self._system_ids):
            raise ValueError(f"sinks must be in 1..{len(self._system_ids)} (the system prompt's tokens), got {sinks}")
        if vision_budget is None:
            vision_budget = MEMORY_VISION_BUDGET if scores_slots(policy) else 0
        pol = make_policy(policy, sinks=sinks, recent=recent, beta=beta, decay=decay, vision_budget=vision_budget)
        self.cache = decoder.new_cache(capacity, max_chunk, pol, slack=slack)
        self.backend.load_engines(self.cache)
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the stream; keep the system prompt."""
        with self._lock:
            self.cache.reset()
            self.scene.reset()
            self.frames_ingested = 0
            self.last_stamp_s = -math.inf  # newest stamp over all cameras
            self.camera_stamps: dict[str, float] = {}  # newest stamp per camera: each camera's order
            self._last_stored_s: dict[str, float] = {}  # per camera
            # Per stored frame while it holds slots; both pruned together in ingest_frame:
            self._frame_info: dict[int, tuple[str, str, Pose | None]] = {}  # -> (camera, label, pose)
            self._thumbs: dict[int, np.ndarray] = {}  # -> THUMBNAIL_SIZE RGB
            self._prune_at = THUMBNAIL_PRUNE_EVERY
            self._prefill(self._system_ids, SlotKind.SINK, logits=False)

    def _prefill(
        self, ids: list[int], kind: SlotKind = SlotKind.TEXT, logits: bool = True
    ) -> tuple[torch.Tensor | None, int]:
        """Run ``ids`` through the cache in chunks of ``max_chunk``: (fp32 logits ``[vocab]`` of
        the last token or None, tokens in the last chunk). Call with the lock held."""
        step = self.cache.max_chunk
        for s in range(0, len(ids), step):
            last = self.backend.run_chunk(self._embed_ids(ids[s : s + step]), self.cache, kind, logits=logits)
        return last, len(ids) - s

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        return self.backend.embed(torch.tensor(ids, dtype=torch.int64, device=self.cache.k.device))

    def ingest_frame(
        self, rgb: np.ndarray, stamp_s: float, camera: str = "front", pose: Pose | None = None
    ) -> FrameResult:
        """Append one frame (tag + vision tokens) and run the eviction policy; a familiar frame
        within ``familiar_interval_s`` of its camera's last stored one only updates the scene.

        Args:
            rgb: uint8 ``[H, W, 3]`` RGB (or float in [0, 1]).
            stamp_s: frame time in seconds (stream or ROS time), not older than this camera's
                newest frame (cameras are ordered each on its own clock; :meth:`restart_camera`
                forgets a camera's order after its clock jumped back).
            camera: camera name for the tag.
            pose: where the robot was, if known now (:meth:`set_frame_pose` gives it later).

        Raises:
            TypeError / ValueError: bad frame (see :func:`~infmllm_ros.models.vision.check_rgb`,
                or the family's processor), a NaN or older stamp, an empty camera name, a frame
                chunk longer than ``max_chunk``. The stream is unchanged.
        """
        t0 = time.perf_counter()
        camera, frame, novelty, novel = self._look(rgb, stamp_s, camera)
        store = novel or stamp_s - self._last_stored_s.get(camera, -math.inf) >= self.familiar_interval_s
        if store:
            chunk = self.model.frame_chunk(self.template.frame_tag(stamp_s, camera), frame if novel else None)
            if len(chunk) > self.cache.max_chunk:
                raise ValueError(
                    f"a frame chunk of {len(chunk)} tokens exceeds max_chunk={self.cache.max_chunk}; "
                    f"raise max_chunk or lower the frame's vision tokens"
                )
            embeds, kinds = self.chunk_embeds(chunk)
            thumb = cv2.resize(check_rgb(rgb), THUMBNAIL_SIZE, interpolation=cv2.INTER_AREA)
        t1 = time.perf_counter()
        with self._lock:
            self._check_order(camera, stamp_s)  # again under the lock (two ingest threads)
            before = self.cache.evicted_tokens
            frame_id = self.frames_ingested
            if store:
                self.backend.run_chunk(
                    embeds,
                    self.cache,
                    kinds,
                    frame_id=frame_id,
                    stamp_s=float(stamp_s),
                    logits=False,
                    mrope=chunk.mrope,
                    deepstack=chunk.deepstack_inputs(),
                )
                self._last_stored_s[camera] = float(stamp_s)
                self._frame_info[frame_id] = (camera, frame.label if novel else "", pose)
                self._thumbs[frame_id] = thumb
                if len(self._thumbs) > self._prune_at:  # drop the records of frames that left the cache
                    present = set(self.cache.frames()[0])
                    self._frame_info = {f: c for f, c in self._frame_info.items() if f in present}
                    self._thumbs = {f: t for f, t in self._thumbs.items() if f in present}
                    self._prune_at = len(self._thumbs) + THUMBNAIL_PRUNE_EVERY
            self.scene.observe(camera, frame.summary)
            self.frames_ingested += 1
            self.camera_stamps[camera] = float(stamp_s)
            self.last_stamp_s = max(self.last_stamp_s, float(stamp_s))
            evicted = self.cache.evicted_tokens - before
        t2 = time.perf_counter()
        return FrameResult(
            frame_id,
            embeds.shape[0] if store else 0,
            frame.label,
            (t1 - t0) * 1e3,
            (t2 - t1) * 1e3,
            evicted,
            novelty,
            novel,
            store,
        )

    def _look(self, rgb: np.ndarray, stamp_s: float, camera: str) -> tuple[str, FrameEncoding, float, bool]:
        """Check a frame's stamp and camera, encode it and gauge its novelty (nothing is stored):
        ``(camera name stripped, encoding, novelty, novel)``. Raises as :meth:`ingest_frame`."""
        if not isinstance(stamp_s, (int, float)) or not math.isfinite(stamp_s):
            raise ValueError(f"frame stamp must be a finite number of seconds, got {stamp_s!r}")
        if not isinstance(camera, str) or not camera.strip():
            raise ValueError("camera name is empty")
        camera = camera.strip()
        self._check_order(camera, stamp_s)
        frame = self.model.encode_frame(rgb, self.backend.vision)
        novelty = self.scene.novelty(camera, frame.summary)
        return camera, frame, novelty, self.scene.is_novel(novelty)

    def memory_frames(self) -> list[MemoryFrame]:
        """The frames that still hold slots in the KV cache, oldest first, with their thumbnails
        (what ``~/memory_image`` shows)."""
        with self._lock:
            ids = self.cache.frame[:, :, : self.cache.length]
            rows = ids.shape[0] * ids.shape[1]
            frames, stamps = self.cache.frames()
            counts = torch.bincount(ids[ids >= 0].long().flatten()) if frames else torch.zeros(0)
            info = {f: self._frame_info.get(f, UNKNOWN_FRAME) for f in frames}
            return [
                MemoryFrame(f, s, info[f][0], info[f][1], float(counts[f]) / rows, self._thumbs.get(f), info[f][2])
                for f, s in zip(frames, stamps)
            ]

    def set_frame_pose(self, frame_id: int, pose: Pose) -> bool:
        """Give a stored frame the robot's pose (a pose that arrived after the frame, or a nearer
        one); False when the frame is not in memory any more."""
        with self._lock:
            if frame_id not in self._frame_info:
                return False
            camera, label, _ = self._frame_info[frame_id]
            self._frame_info[frame_id] = (camera, label, pose)
            return True

    def _check_order(self, camera: str, stamp_s: float) -> None:
        last = self.camera_stamps.get(camera, -math.inf)
        if stamp_s < last:
            raise ValueError(f"frame stamp {stamp_s:.3f}s is older than camera {camera!r}'s last frame ({last:.3f}s)")

    def restart_camera(self, camera: str) -> None:
        """Forget ``camera``'s frame order (its clock jumped back: a bag loop, a simulator
        restart), so its next frame is taken whatever its stamp; the memory is kept."""
        with self._lock:
            self.camera_stamps.pop(camera, None)

    def chunk_embeds(self, chunk: FrameChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """A frame chunk as input embeddings ``[n, hidden]`` and int8 slot kinds ``[n]`` (the
        tag and markers are TEXT, the vision tokens VISION)."""
        parts = [self._embed_ids(chunk.before)]
        if chunk.vision is not None:
            parts.append(chunk.vision.to(parts[0].device, parts[0].dtype))
        if chunk.after:
            parts.append(self._embed_ids(chunk.after))
        embeds = torch.cat(parts)
        kinds = torch.full((embeds.shape[0],), int(SlotKind.TEXT), dtype=torch.int8, device=embeds.device)
        kinds[len(chunk.before) : len(chunk.before) + chunk.vision_tokens] = int(SlotKind.VISION)
        return embeds, kinds

    def ask(
        self,
        question: str,
        max_new_tokens: int = 48,
        keep_in_context: bool = True,
        sampling: Sampling | None = None,
        deadline_s: float | None = None,
        cancel: threading.Event | None = None,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> Answer:
        """Answer ``question`` from what is in the cache, evidence first.

        The question is prefilled as a user turn; the frames in the cache that match it are
        found (:attr:`Answer.sightings`) and judged (:attr:`Answer.verdict`,
        :attr:`Answer.confidence`); the evidence is rendered into the same turn as a memory
        line (:meth:`.answer.AnswerTemplate.evidence`) followed by the question again after the
        template's ``question_label``, so the model answers knowing when (without the repeat, a small
        model takes the memory line for an answer already given; repeated bare, for the operator
        asking again after a wrong answer: bench/results/README.md, "Answers"); then the answer is
        decoded (``sampling``, default the session's; the repetition controls look at the
        answer's own tokens; a short question stops at the first sentence end; the answer
        cannot write a frame tag's opening in any case). A complete answer whose text contradicts
        its evidence is replaced by the evidence sentence (:attr:`Answer.answer_source`; with
        ``keep_in_context`` the cache keeps the generated tokens).

        The question is operator text (:meth:`operator_ids`): special-token strings in it stay
        characters and ``<``/``>`` become ``‹``/``›``, so it can neither close the turn nor
        pass for a frame tag. With ``keep_in_context`` the question, memory line and answer stay
        in the cache as DIALOGUE slots, which sightings never match: what an operator says is
        context for later rounds, never memory of a camera.

        Args:
            question: the operator's question (non-empty, at most ``max_question_tokens``).
            max_new_tokens: most tokens generated (>= 1).
            keep_in_context: keep the question and answer in the cache for later rounds; if
                False the cache is restored to its state before the question.
            sampling: decoding for this answer (None: the session's).
            deadline_s: ``time.monotonic()`` value after which decoding stops and the answer so
                far is returned with ``stopped="deadline"`` (None: no deadline).
            cancel: an event (anything with ``is_set()``); once set, from any thread, decoding
                stops at the next token, the answer so far is returned with
                ``stopped="cancelled"`` and the cache is left as it was before the question,
                whatever ``keep_in_context``.
            on_token: called with the answer's token ids so far after each generated token
                (on this thread; for streaming partial answers).

        Raises:
            ValueError: empty question, a question over ``max_question_tokens`` tokens
                (:class:`QuestionTooLong`),
                ``max_new_tokens`` outside 1..:data:`MAX_NEW_TOKENS_LIMIT`. The stream is unchanged.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question is empty")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens={max_new_tokens} is outside 1..{MAX_NEW_TOKENS_LIMIT}")
        settings = self.answer_settings  # one answer, one set of settings, whatever is set meanwhile
        head, lead, newline, tail = self.question_turn()
        question_ids = self.operator_ids(question, lead)
        if len(question_ids) > settings.max_question_tokens:
            raise QuestionTooLong(
                f"question is {len(question_ids)} tokens; the limit is {settings.max_question_tokens} "
                "(max_question_tokens)"
            )
        label, label_lead = split_trailing_space(self.template.question_label)
        short = 0 < len(question.split()) <= settings.sentence_stop_words
        stopped: list[Stopped] = []

        def stop_after(out: list[int]) -> bool:
            if on_token is not None:
                on_token(out)
            if cancel is not None and cancel.is_set():
                stopped.append(Stopped.CANCELLED)
            elif deadline_s is not None and time.monotonic() >= deadline_s:
                stopped.append(Stopped.DEADLINE)
            return bool(stopped) or (short and self._sentence_end(out))

        t0 = time.perf_counter()
        with self._lock:
            snap = None if keep_in_context and cancel is None else self.cache.snapshot()
            done = False
            try:
                _, newest = self._prefill(head + question_ids + newline, SlotKind.DIALOGUE, logits=False)
                # The question's last chunk is the newest slots, which every policy keeps.
                sightings = self._sightings(newest)
                notes = self._frame_notes()
                found, sightings = self.template.judge(
                    question, sightings, notes, settings.seen_threshold, self.model.label_concepts
                )
                _, confidence = judge(sightings, settings.seen_threshold)
                evidence = self.template.evidence(
                    question,
                    found,
                    sightings,
                    notes,
                    settings.seen_threshold,
                    settings.evidence_sightings,
                    len(self._last_stored_s) > 1,
                    settings.near_radius_m,
                )
                # The question again after the memory line, labelled: the turn ends on what to answer.
                again = (
                    (
                        self.tokenizer.encode(evidence.line)
                        + newline
                        + self.tokenizer.encode(label)
                        + self.operator_ids(question, label_lead)
                    )
                    if evidence.line
                    else []
                )
                last, _ = self._prefill(again + tail, SlotKind.DIALOGUE)
                t1 = time.perf_counter()
                sampling = sampling or settings.sampling
                sampling = replace(sampling, bad_words_ids=sampling.bad_words_ids + self._tag_ban)
                out = decode(
                    self.backend,
                    self.cache,
                    last,
                    max_new_tokens,
                    self.tokenizer.stop_ids,
                    sampling,
                    stop_after=stop_after,
                    close_id=self.tokenizer.turn_end_id,
                    kind=SlotKind.DIALOGUE,
                )
                t2 = time.perf_counter()
                frames, stamps = self.cache.frames()
                length = self.cache.length
                done = True
            finally:
                if snap is not None and (not done or not keep_in_context or stopped == [Stopped.CANCELLED]):
                    self.cache.restore(snap)
            if stopped == [Stopped.CANCELLED]:  # the stream is as it was before the question
                frames, stamps = self.cache.frames()
                length = self.cache.length
        rate = (len(out) - 1) / (t2 - t1) if len(out) > 1 and t2 > t1 else 0.0
        text, source, problems = self.tokenizer.decode(out).strip(), "model", []
        if not stopped:  # a partial answer says so with `stopped`; a complete one must agree with its evidence
            text, source, problems = self.template.settle(text, evidence, {n.label for n in notes.values()})
        return Answer(
            text=text,
            latency_s=t2 - t0,
            ttft_s=t1 - t0,
            decode_tokens_per_s=rate,
            new_tokens=len(out),
            tokens_in_cache=length,
            frames_in_context=len(frames),
            first_frame_s=stamps[0] if stamps else math.nan,
            last_frame_s=stamps[-1] if stamps else math.nan,
            sightings=tuple(sightings[:3]),
            token_ids=tuple(out),
            seen=evidence.verdict is Verdict.SEEN,
            confidence=confidence,
            evidence=evidence.line,
            stopped=stopped[0] if stopped else Stopped.NONE,
            verdict=evidence.verdict.value,
            answer_source=source,
            problems=tuple(problems),
        )

    def save_memory(self, path: str | Path, extra: dict | None = None) -> int:
        """Write the stream's memory to ``path`` atomically (:func:`.memory_file.save_memory`);
        its size in bytes. Raises FileExistsError (``path`` is not a memory file of this stream)
        or OSError (the folder cannot be written); the old file is untouched."""
        return save_memory(self, path, extra)

    def load_memory(self, path: str | Path) -> dict:
        """Replace the stream's memory with ``path``'s (:func:`.memory_file.load_memory`); the
        file's ``extra``. Raises FileNotFoundError or :class:`.memory_file.MemoryFileRefused` (a
        ValueError; the stream and the file are unchanged)."""
        return load_memory(self, path)

    def operator_ids(self, text: str, lead: str = "") -> list[int]:
        """Token ids of operator text: stripped, ``<`` and ``>`` replaced by ``‹`` and ``›`` (no
        frame tag or markup can be written), special-token strings read as plain characters
        (:meth:`~infmllm_ros.models.tokenizer.ChatTokenizer.encode_plain`); ``lead``: the
        whitespace that ends the text before it (:meth:`question_turn`), encoded with it as one
        pass of the template's text would."""
        return self.tokenizer.encode_plain(lead + text.strip().replace("<", "\u2039").replace(">", "\u203a"))

    def question_turn(self) -> tuple[list[int], str, list[int], list[int]]:
        """The user turn of a question in the chat template, as ids around the operator's text:
        ``(the turn's opening, its trailing whitespace, a newline, the turn's end + the
        assistant's opening)``; the prompt is ``opening + operator_ids(question, whitespace) +
        newline [+ memory line + newline + question label + question] + end``. The opening's
        trailing whitespace (SmolVLM's ``User: ``) goes with the question, so the ids are the
        template's text tokenised in one pass (a byte-level BPE merges ``" What"``)."""
        head, tail = self.tokenizer.render_turn("user", "\0", add_generation_prompt=True).split("\0")
        core, lead = split_trailing_space(head)
        return self.tokenizer.encode(core), lead, self.tokenizer.encode("\n"), self.tokenizer.encode(tail)

    def _sightings(self, question_tokens: int) -> list[Sighting]:
        """Every frame of vision tokens in the cache, best match to the newest ``question_tokens``
        slots first, with its camera (:func:`.recall.find_sightings`; call under the lock)."""
        sightings = find_sightings(self.cache, question_tokens, self.recall_layer, top=self.cache.length)
        info = [self._frame_info.get(x.frame_id, UNKNOWN_FRAME) for x in sightings]
        return [replace(x, camera=camera, pose=pose) for x, (camera, _, pose) in zip(sightings, info)]

    def _frame_notes(self) -> dict[int, FrameNote]:
        """The frames in the cache by id, with camera and label (call under the lock)."""
        frames, stamps = self.cache.frames()
        return {
            f: FrameNote(f, s, *self._frame_info.get(f, UNKNOWN_FRAME), self.track_positions)
            for f, s in zip(frames, stamps)
        }

    def _sentence_end(self, out: list[int]) -> bool:
        """Whether the answer so far ends a sentence: ``.``, ``!`` or ``?`` after at least two
        tokens, a ``.`` not right after a digit (``t=60.5 s`` goes on)."""
        text = self.tokenizer.decode(out).rstrip()
        return len(out) >= 2 and text.endswith((".", "!", "?")) and not (text[-1] == "." and text[-2:-1].isdigit())


def open_session(
    model: VisionLanguageModel,
    backend: str = "torch",
    engine_dir: str | Path = "engines",
    progress: Callable[[str], None] = print,
    **kwargs,
) -> StreamSession:
    """A new stream over ``model``'s weights on ``backend`` (:data:`~.backends.BACKENDS`);
    ``kwargs`` go to :class:`StreamSession`. One model can serve many sessions.

    Raises:
        ValueError: an unknown backend, or see :class:`StreamSession`.
    """
    runner = make_backend(backend, model.decoder, engine_dir, model.name, progress, model)
    return StreamSession(model, backend=runner, **kwargs)
