"""The retrieval baseline of the needle benchmark (``infmllm-bench-needle --policy index``).

A plain retrieval memory, as robot memories like ReMEmbR keep one: every frame's summary and time
in an unbounded list, nothing of the stream in the KV cache. Here the summary is what the answer
rule reads: the family's label of each frame (for frames the same novelty gate calls new; the
others are "nothing new"), its time and camera, and the classifier's confidence as the match
score. A question is judged by the same rule (:meth:`~infmllm_ros.runtime.answer.AnswerTemplate.judge`:
a frame whose label *is* the asked object), rendered as the same memory line and answered by the
same model, whose cache holds only the system prompt and the question. The comparison it makes:
what the bounded KV cache keeps against a memory that forgets nothing, and at what memory cost
(:attr:`RetrievalSession.index_bytes` against the cache's bytes).
"""

from __future__ import annotations

import time

import numpy as np

from ..runtime.answer import FrameNote
from ..runtime.recall import Sighting
from ..runtime.session import FrameResult, StreamSession

#: Bytes an index entry costs besides its strings: frame id, stamp and score (8 bytes each).
ENTRY_BYTES = 24


class RetrievalSession(StreamSession):
    """A :class:`StreamSession` whose frames go to an unbounded index instead of the KV cache;
    questions are answered as the session answers them (same template, verdict, evidence line and
    model). ``kwargs`` as for :class:`StreamSession` (the cache only holds the question)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.index: list[FrameNote] = []
        self._confidence: list[float] = []

    @property
    def index_bytes(self) -> int:
        """Memory the index holds: each entry's label and camera (UTF-8) and its numbers."""
        return sum(len(n.label.encode()) + len(n.camera.encode()) + ENTRY_BYTES for n in self.index)

    def reset(self) -> None:
        """Forget the stream and the index."""
        super().reset()
        self.index, self._confidence = [], []

    def ingest_frame(self, rgb: np.ndarray, stamp_s: float, camera: str = "front") -> FrameResult:
        """Add one frame to the index (no prefill, no KV slots). Raises as
        :meth:`StreamSession.ingest_frame` does."""
        t0 = time.perf_counter()
        camera, frame, novelty, novel = self._look(rgb, stamp_s, camera)
        with self._lock:
            frame_id = self.frames_ingested
            self.index.append(FrameNote(frame_id, float(stamp_s), camera, frame.label if novel else ""))
            self._confidence.append(float(frame.summary.max()))
            self.scene.observe(camera, frame.summary)
            self.frames_ingested += 1
            self.camera_stamps[camera] = self._last_stored_s[camera] = float(stamp_s)
            self.last_stamp_s = max(self.last_stamp_s, float(stamp_s))
        return FrameResult(
            frame_id, 0, frame.label, (time.perf_counter() - t0) * 1e3, 0.0, 0, novelty, novel, stored=False
        )

    def _sightings(self, question_tokens: int) -> list[Sighting]:
        """Every labelled frame of the index, the classifier's most confident first."""
        found = [Sighting(n.frame_id, n.stamp_s, c, n.camera) for n, c in zip(self.index, self._confidence) if n.label]
        return sorted(found, key=lambda x: -x.score)

    def _frame_notes(self) -> dict[int, FrameNote]:
        """The whole index by frame id."""
        return {n.frame_id: n for n in self.index}
