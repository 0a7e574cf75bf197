"""Bag-free drives for tests and benchmarks: real video looped to any length, with real photos
("events") inserted at known times, a manifest of events and questions, and answer scoring.

Frames are sampled from the video by time (``fps`` sampled frames per second of drive), looping
the clip as needed; an event replaces the sampled frame at its time. Events default to photos
bundled in scikit-image's wheel; ``events_from_dir`` reads images named by label
(``cat.jpg``, ``fire_truck.png``) with OpenCV.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.answer import answer_times, is_clear_no
from ..runtime.recall import with_article

# Words that count as naming each bundled event (its ImageNet class's main word and synonyms).
BUNDLED_EVENT_WORDS = {
    "cat": ("cat", "tabby", "kitten"),
    "coffee": ("coffee", "espresso", "cup", "mug"),
    "rocket": ("rocket", "missile", "shuttle"),
    "motorcycle": ("motorcycle", "moped", "scooter", "motorbike"),
    "astronaut": ("astronaut", "spacesuit", "space suit"),
    "camera": ("camera", "tripod", "photographer"),
}


@dataclass(frozen=True)
class Event:
    """A photo shown at ``time_s`` seconds into the drive; ``words`` name it in an answer."""

    label: str
    time_s: float
    words: tuple[str, ...]

    @property
    def question(self) -> str:
        """The question asked about this event. Phrased as "Was there a cat? At what time?":
        SmolLM2-135M answers "Did you see a cat? When?" with "as a robot I cannot see" (measured on
        a 1-minute dashcam drive; the other phrasing named the cat)."""
        return f"Was there {with_article(self.label.replace('_', ' '))}? At what time?"


#: Objects never shown in a drive, asked about to check that the answer is a clear no.
ABSENT_OBJECTS = ("giraffe", "horse", "umbrella", "pizza", "bicycle", "dog")


#: For each bundled event, an object like it that no drive shows: asked about to check that a
#: near miss is a clear no ("No; the closest I saw was a domestic cat at t=60 s.").
NEAR_MISS_OBJECTS = {
    "cat": "dog",
    "coffee": "teapot",
    "rocket": "airplane",
    "motorcycle": "tractor",
    "astronaut": "scuba diver",
    "camera": "telescope",
}


def absent_question(label: str) -> str:
    """The question about an object that was never shown."""
    return f"Was there {with_article(label)}? At what time?"


def bundled_events() -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Real photos from scikit-image: label -> (uint8 RGB image, accepted words)."""
    from skimage import data

    images = {
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "astronaut": data.astronaut(),
        "camera": np.repeat(data.camera()[..., None], 3, axis=2),
    }
    return {k: (np.ascontiguousarray(v[..., :3]), BUNDLED_EVENT_WORDS[k]) for k, v in images.items()}


def events_from_dir(path: str | Path) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Images in ``path`` named by label (``fire_truck.jpg`` -> "fire truck").

    Raises:
        FileNotFoundError: missing folder or no readable image in it.
    """
    import cv2

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"events folder not found: {path}")
    out = {}
    for f in sorted(path.iterdir()):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        if img is not None:
            label = f.stem.replace("_", " ")
            out[label] = (cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (label.split()[-1],))
    if not out:
        raise FileNotFoundError(f"no readable images in {path}")
    return out


def synthetic_road(t: float) -> np.ndarray:
    """A drawn dashcam frame (sky, grey road, lane markings moving with ``t`` seconds), uint8
    RGB ``[240, 320, 3]``: the background when no real video is at hand (unit tests, a fresh
    machine without ``../shared/data``)."""
    import cv2

    img = np.zeros((240, 320, 3), np.uint8)
    img[:110] = (135, 170, 210)
    img[110:] = (90, 90, 90)
    shift = int(t) % 5 * 4
    for x0 in (60, 260):
        cv2.line(img, (160, 110), (x0 + shift, 239), (240, 240, 240), 4)
    return img


@dataclass(frozen=True)
class LoopedClip:
    """Frames sampled at ``fps``; calling it with t (seconds) gives the frame at ``t`` modulo
    the clip's length."""

    frames: list
    fps: float

    def __call__(self, t: float) -> np.ndarray:
        return self.frames[int(round(t * self.fps)) % len(self.frames)]


def iter_video(path: str | Path, fps: float):
    """Decode the clip at ``path`` one frame at a time, sampled at ``fps`` per second (<= 0:
    every frame): yields ``(t seconds, uint8 RGB [H, W, 3])``, holding one frame in memory.

    Raises:
        FileNotFoundError: missing file. ValueError: OpenCV cannot decode a single frame.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    native = cap.get(cv2.CAP_PROP_FPS) or 30.0
    i, next_t, any_frame = 0, 0.0, False
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            t = i / native
            if fps <= 0 or t >= next_t:
                any_frame = True
                yield t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                next_t += 1.0 / fps if fps > 0 else 0.0
            i += 1
    finally:
        cap.release()
    if not any_frame:
        raise ValueError(f"{path}: no frames could be decoded")


def video_frames(path: str | Path, fps: float) -> LoopedClip:
    """The clip at ``path`` as a :class:`LoopedClip`: t (seconds) -> uint8 RGB frame at ``t``
    modulo the clip length.

    The clip is decoded once at ``fps`` samples per second (memory: one frame per sample of
    one loop of the clip, e.g. 8 s x 1 fps = 8 frames).

    Raises:
        FileNotFoundError: missing file. ValueError: OpenCV cannot decode it.
    """
    return LoopedClip([rgb for _, rgb in iter_video(path, fps)], fps)


@dataclass
class Drive:
    """A drive of ``minutes`` at ``fps`` sampled frames/s with events at seeded random times.

    Args:
        background: t (seconds) -> RGB frame (e.g. :func:`video_frames`, or a test's generator).
        minutes: drive length. fps: sampled frames per second.
        events: label -> (image, words) (e.g. :func:`bundled_events`).
        seed: RNG seed for event times (spread over the drive, >= 20 s apart, not in the first
            20 s, whose first frame a :class:`~infmllm_ros.runtime.novelty.SceneNovelty` gate takes
            as the background, nor in the last 10%, so a question can follow).
        at: label -> seconds into the drive, to place events by hand instead (every label must
            be in ``events``); the seed is then unused.
        again: labels of events shown a second time, at another seeded time: "again at t=..."
            must name both.

    Raises:
        ValueError: non-positive length or rate, too many events for the drive, or a hand-placed
            event outside the drive or not in ``events``.
    """

    background: Callable[[float], np.ndarray]
    minutes: float
    fps: float
    events: dict[str, tuple[np.ndarray, tuple[str, ...]]]
    seed: int = 0
    at: dict[str, float] | None = None
    again: tuple[str, ...] = ()
    schedule: list[Event] = field(init=False)

    def __post_init__(self):
        if self.minutes <= 0 or self.fps <= 0:
            raise ValueError(f"minutes and fps must be > 0, got {self.minutes}, {self.fps}")
        if self.at is not None:
            for label, t in self.at.items():
                if label not in self.events:
                    raise ValueError(f"event {label!r} has no image (known: {', '.join(sorted(self.events))})")
                if not 0 <= t < self.minutes * 60:
                    raise ValueError(f"event {label!r} at {t} s is outside the {self.minutes}-minute drive")
            self.schedule = sorted(
                (Event(label, round(t * self.fps) / self.fps, self.events[label][1]) for label, t in self.at.items()),
                key=lambda e: e.time_s,
            )
            return
        stride = max(1, int(20 * self.fps))  # frames between candidate event times (>= 20 s)
        candidates = int(self.n_frames * 0.9) // stride - 1  # slot 0 (the first frame) is not one
        unknown = [label for label in self.again if label not in self.events]
        if unknown or len(set(self.again)) != len(self.again):
            raise ValueError(
                f"events shown again must be distinct events (known: {', '.join(sorted(self.events))}), "
                f"got {list(self.again)}"
            )
        shown = len(self.events) + len(self.again)
        if shown > candidates:
            raise ValueError(f"{shown} events do not fit in a {self.minutes}-minute drive")
        rng = np.random.default_rng(self.seed)
        slots = 1 + np.sort(rng.choice(candidates, len(self.events), replace=False))
        order = rng.permutation(sorted(self.events))
        if self.again:  # drawn after the first schedule, so a drive without repeats is as it was
            free = np.setdiff1d(np.arange(1, candidates + 1), slots)
            later = rng.choice(free, len(self.again), replace=False)
            slots, order = np.concatenate([slots, later]), np.concatenate([order, list(self.again)])
        self.schedule = sorted(
            (Event(str(label), float(s * stride / self.fps), self.events[label][1]) for s, label in zip(slots, order)),
            key=lambda e: e.time_s,
        )

    @property
    def n_frames(self) -> int:
        """Sampled frames in the drive."""
        return int(self.minutes * 60 * self.fps)

    def frames(self) -> Iterator[tuple[float, np.ndarray, str | None]]:
        """Yield ``(t_s, rgb, event label or None)`` for every sampled frame."""
        at = {round(e.time_s * self.fps): e.label for e in self.schedule}
        for i in range(self.n_frames):
            t = i / self.fps
            label = at.get(i)
            yield t, (self.events[label][0] if label else self.background(t)), label

    def manifest(self) -> dict:
        """Events with times, words and questions (JSON-ready)."""
        return {
            "minutes": self.minutes,
            "fps": self.fps,
            "seed": self.seed,
            "events": [
                {"label": e.label, "time_s": e.time_s, "words": list(e.words), "question": e.question}
                for e in self.schedule
            ],
        }


class OdometryTrack:
    """A robot's smooth path for a drive: speed between 1 and 10 m/s and a slowly turning heading,
    integrated at ``rate_hz`` (Euler steps of ``1 / rate_hz`` s), deterministic per ``seed``.

    Args:
        seconds: the drive's length. rate_hz: odometry messages per second (10-50 on robots).
        seed: draws the phases of the speed and heading waves.

    Raises:
        ValueError: a non-positive length or rate.
    """

    def __init__(self, seconds: float, rate_hz: float = 20.0, seed: int = 0):
        if seconds <= 0 or rate_hz <= 0:
            raise ValueError(f"track length and rate must be > 0, got {seconds} s, {rate_hz} Hz")
        rng = np.random.default_rng(seed + 7919)
        phase = rng.uniform(0, 2 * np.pi, 3)
        self.rate_hz = float(rate_hz)
        self.t = np.arange(int(np.ceil(seconds * rate_hz)) + 1) / rate_hz
        speed = 5.5 + 4.5 * np.sin(2 * np.pi * self.t / 97 + phase[0])  # m/s in [1, 10]
        self.yaw = 0.8 * np.sin(2 * np.pi * self.t / 211 + phase[1]) + 0.4 * np.sin(2 * np.pi * self.t / 53 + phase[2])
        step = speed / rate_hz
        self.x = np.concatenate([[0.0], np.cumsum(step * np.cos(self.yaw))[:-1]])
        self.y = np.concatenate([[0.0], np.cumsum(step * np.sin(self.yaw))[:-1]])

    def at(self, t: float) -> tuple[float, float, float]:
        """``(x, y, yaw)`` (metres, radians) at ``t`` seconds (linear between samples)."""
        return (
            float(np.interp(t, self.t, self.x)),
            float(np.interp(t, self.t, self.y)),
            float(np.interp(t, self.t, self.yaw)),
        )

    def samples(self):
        """``(t, x, y, yaw)`` of every odometry message."""
        return zip(self.t.tolist(), self.x.tolist(), self.y.tolist(), self.yaw.tolist())


def time_tolerance_s(minutes: float) -> float:
    """How close a stated time must be to the event: 10 s on drives up to 10 minutes, the right
    minute (60 s) on longer ones."""
    return 10.0 if minutes <= 10 else 60.0


def score_answer(answer: str, event: Event, tolerance_s: float = 10.0, seen_at_s: float | None = None) -> dict:
    """Did ``answer`` name the event, and say when within ``tolerance_s`` of it?

    Args:
        answer: the reply text. event: what was shown and when.
        tolerance_s: :func:`time_tolerance_s` of the drive.
        seen_at_s: stamp (seconds) of the answer's best sighting
            (:func:`~infmllm_ros.runtime.recall.find_sightings`), or None when it had none.

    Returns:
        ``named``: one of the event's words is in the text; ``timed``: a time the text states
        (:func:`~infmllm_ros.runtime.answer.answer_times`) is within the tolerance; ``time_error_s``: seconds from the
        event to the closest stated time (None when the text states none); ``recalled``: the
        best sighting from the cache is within the tolerance (scored apart: it is the cache's,
        not the answer's); ``correct = named and timed``, so an answer that echoes the
        question's word cannot score; ``degenerate``: the text repeats a 4-word sequence.
    """
    text = answer.lower()
    named = any(w in text for w in event.words)
    errors = [abs(t - event.time_s) for t in answer_times(text)]
    timed = any(e <= tolerance_s for e in errors)
    recalled = seen_at_s is not None and abs(seen_at_s - event.time_s) <= tolerance_s
    return {
        "named": named,
        "timed": timed,
        "time_error_s": min(errors) if errors else None,
        "recalled": recalled,
        "correct": named and timed,
        "degenerate": repeats_ngram(answer),
    }


def score_times(answer: str, times_s: list[float], tolerance_s: float = 10.0) -> dict:
    """For an event shown more than once: ``all_timed`` when ``answer`` states a time within
    ``tolerance_s`` of every one of ``times_s``, each stated time standing for one showing only
    (so one time between two close showings cannot count for both); ``timed`` how many it does."""
    stated = sorted(answer_times(answer.lower()))
    hits = 0
    for x in sorted(times_s):
        near = [t for t in stated if abs(t - x) <= tolerance_s]
        if near:
            stated.remove(min(near, key=lambda t: abs(t - x)))
            hits += 1
    return {"timed": hits, "all_timed": hits == len(times_s)}


def window_minutes(minutes: float) -> tuple[int, int]:
    """The window (whole minutes) a drive's time-window question asks about: its middle third."""
    a = max(1, round(minutes / 3))
    return a, max(a + 1, round(2 * minutes / 3))


def score_window(answer: str, expected: dict[str, list[str]]) -> dict:
    """A time-window answer: ``named`` events of ``expected`` (label -> words, the events shown
    in the window) the answer names; ``correct`` when it names them all, or, with none in the
    window, says it saw nothing new or remembers no frame there."""
    text = answer.lower()
    named = sum(any(w in text for w in words) for words in expected.values())
    empty = not expected and ("nothing new" in text or "no frame" in text)
    return {"named": named, "expected": len(expected), "correct": named == len(expected) > 0 or empty}


def repeats_ngram(text: str, n: int = 4) -> bool:
    """Whether ``text`` holds the same ``n`` consecutive words twice (case and punctuation
    ignored): the mark of a looping answer."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def names_unshown(answer: str, vocabulary: dict[str, tuple[str, ...]], shown: set[str]) -> bool:
    """Whether ``answer`` names an object class of ``vocabulary`` (label -> words) that is not in
    ``shown`` (the drive's event labels) and does not deny it: a hallucination."""
    text = answer.lower()
    named = any(
        any(re.search(rf"\b{re.escape(w)}", text) for w in words)
        for label, words in vocabulary.items()
        if label not in shown
    )
    return named and not is_clear_no(answer)
