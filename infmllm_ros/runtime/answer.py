"""How a question is put to the model, and how its answer is held to the evidence.

An :class:`AnswerTemplate` is one object per model family: the frame tag every stored frame
starts with, the system prompt, the memory line (the evidence) rendered into the question's turn,
the label of the question's second copy, and the check of an answer against its evidence. The
session (:class:`~.session.StreamSession`) keeps the stream, the lock and the order of work; what
is said, and what may be said, is here. A family with other wording is one subclass and one
entry in :data:`TEMPLATES`.

Rules, for every family:

* **Verdict** (:meth:`AnswerTemplate.judge`). When the question names an object ("Was there a
  dog?", :func:`asked_object`) and the family's frame labels carry what they *are*
  (:meth:`~infmllm_ros.models.family.VisionLanguageModel.label_concepts`: a Silky Terrier is a
  dog, an espresso is a coffee), the object is ``seen`` exactly when a frame in memory is one, and
  the best-matching such frame is the evidence; no frame is one: ``not seen``. This does not
  depend on any clip's score scale. Otherwise (no object named, or labels without that
  knowledge) the score rule (:func:`verdict`): ``seen`` when the best sighting's score reaches the
  threshold, ``not seen`` below it or with no frame of vision tokens, ``undecided`` with a single
  frame of vision tokens (its contrast is 0 by definition: nothing to compare it with). Never
  ``seen`` without evidence.
* **The memory line** states what the verdict rests on: every run of sightings of the seen object
  ("I saw a domestic cat at t=60 s and again at t=2460 s."), the closest frame when the verdict is
  no ("no, the closest I saw was a domestic cat at t=60 s."), the only frame when undecided ("I
  saw a domestic cat at t=20 s.": what memory holds, worded as today's line for one sighting, which
  SmolLM2-135M repeats best; "I saw only ..." cut "What did you see?" from 5 to 3 photos named of 6),
  and,
  for "When did you last see X?", "How many times did you see X?" and "What did you see between
  A and B?", the latest run, the count of runs, or the frames in memory from that window.
* **The text never contradicts the evidence** (:meth:`AnswerTemplate.check`): an answer that
  writes a frame tag (any case) or chat markup, states a time the evidence does not, names an
  object of the memory the evidence does not, or does not say what the verdict says (a "seen"
  answer must name the object and one of the evidence's times and not deny it; a "not seen"
  answer must say no; a time-window answer must name every object the list names) is replaced by
  the evidence sentence itself, and the answer says so (``answer_source``).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from .pose import Pose
from .recall import Sighting, with_article

#: Opening of the text tag that starts every stored frame (:meth:`AnswerTemplate.frame_tag`).
#: Answers may not write it in any case (banned sequences, and :meth:`AnswerTemplate.check`):
#: SmolLM2-135M sometimes opened an answer with an invented tag ("<Frame t=20.1s cam=front> ...")
#: whose time is no sighting.
FRAME_TAG_OPEN = "<frame"

#: Radius of "What did you see near (x, y)?" (metres).
DEFAULT_NEAR_RADIUS_M = 5.0

DEFAULT_SYSTEM_PROMPT = (
    "You are the visual memory of a robot. Camera frames arrive as <frame t=SECONDS cam=NAME> "
    "followed by what the camera saw. Answer the operator briefly, naming what was seen and when."
)

# A time in a text: a clock (h:mm:ss or m:ss), "t=312", or a number with a unit (s, min).
_CLOCK = re.compile(r"\b(?:(\d{1,2}):)?(\d{1,2}):(\d{2})(?:\.\d+)?\b")
_SECONDS = re.compile(r"\bt\s*=\s*(\d+(?:\.\d+)?)|\b(\d+(?:\.\d+)?)\s*(?:s|secs?|seconds?)\b")
_MINUTES = re.compile(r"\b(\d+(?:\.\d+)?)\s*(?:min|mins|minutes?)\b")
_NEGATION = re.compile(r"\b(no|nope|not|nothing|none|never)\b|n't\b")
_STRUCTURE = re.compile(r"[<\u2039]\s*/?\s*frame\b|<\||\|>", re.IGNORECASE)
# Question forms (lower-case text).
_LAST = re.compile(r"\b(last|latest|most recent(ly)?)\b")
_COUNT = re.compile(r"\bhow (many times|often)\b")
_NUMBER = r"(\d+(?:\.\d+)?)"
_UNIT = r"\s*(s|secs?|seconds?|min|mins|minutes?)?"
_ASKED = re.compile(
    r"\b(?:was there|were there|is there|did you (?:ever )?see|have you (?:ever )?seen|"
    r"do you remember|you last see|you see)\s+(?:(?:a|an|any|the|some)\s+)?"
    r"([a-z][a-z' -]*?)(?=\s+(?:at|in|on|near|between|before|after|when|during|today|again)\b"
    r"|\s*[?.!,;]|$)"
)
_ASKED_FIRST = re.compile(r"\b(?:what|which)\s+([a-z][a-z -]*?)\s+(?:did you|do you|have you|was there|were there)\b")
_WINDOW = re.compile(
    rf"\bbetween\s+(minute\s+|min\s+|t\s*=\s*)?{_NUMBER}{_UNIT}\s+and\s+"
    rf"(minute\s+|min\s+|t\s*=\s*)?{_NUMBER}{_UNIT}"
)
_PAIR = r"(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)"
_NEAR = re.compile(rf"\bnear\s*\(?\s*{_PAIR}\s*\)?")
# A position as answers state it: "(12.3, -4.1)".
_PLACE = re.compile(rf"\(\s*{_PAIR}\s*\)")


def answer_times(text: str) -> list[float]:
    """Every time (seconds) stated in ``text``: clocks ``1:02:03`` / ``5:12``, ``t=312``,
    ``312 s`` / ``312 seconds``, ``5 minutes``. A bare number is not a time: "12:22:32.12" must
    not count as 22 s."""
    times = [int(h or 0) * 3600 + int(m) * 60 + int(sec) for h, m, sec in _CLOCK.findall(text)]
    text = _CLOCK.sub(" ", text)  # a clock's parts are not also seconds or minutes
    times += [float(a or b) for a, b in _SECONDS.findall(text)]
    times += [60 * float(x) for x in _MINUTES.findall(text)]
    return times


def places_in(text: str) -> tuple[tuple[float, float], ...]:
    """The positions ``(x, y)`` a text states, in order."""
    return tuple((float(x), float(y)) for x, y in _PLACE.findall(text))


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, lower-case."""
    return re.split(r"(?<=[.!?])\s+", text.strip().lower(), maxsplit=1)[0]


def is_clear_no(text: str) -> bool:
    """Whether the first sentence of ``text`` denies: "No, ...", "I did not see ...", "Nothing
    ...", 'The answer is: "No, there was no horse."'. A text that starts on something else
    ("I saw a horse. No more.") is not a no."""
    return bool(_NEGATION.search(first_sentence(text)))


def asked_object(question: str) -> str | None:
    """The object a question asks about, lower-case: the words after "was there a", "did you
    see an", "did you last see the", ... up to a preposition or the end of the clause ("Was there
    a scuba diver at the pool?" -> "scuba diver"), or between "what"/"which" and "did you" ("What
    animals did you see?" -> "animals"); None when it names none ("What did you see?")."""
    q = question.lower()
    match = _ASKED.search(q) or _ASKED_FIRST.search(q)
    return match.group(1).strip() if match and match.group(1).strip() else None


def object_words(phrase: str) -> set[str]:
    """Forms of an asked object to look up among a label's concepts: the phrase, its last word,
    and both without a plural ``s``/``es`` ("red cars" -> red cars, red car, cars, car)."""
    forms = {phrase, phrase.split()[-1]}
    for form in list(forms):
        for suffix in ("es", "s"):
            if form.endswith(suffix) and len(form) > len(suffix) + 2:
                forms.add(form[: -len(suffix)])
    return forms


def _label_words(label: str) -> list[str]:
    """The words of a label that naming it takes: those of 3 letters or more, lower-case."""
    return re.findall(r"[a-z]{3,}", label.lower())


def _names(text: str, words: list[str]) -> bool:
    """Whether lower-case ``text`` holds one of ``words`` at a word start."""
    return any(re.search(rf"\b{w}", text) for w in words)


class Verdict(enum.StrEnum):
    """Whether the question's object is in the frames in memory (``Ask.verdict``)."""

    SEEN = "seen"
    NOT_SEEN = "not seen"
    UNDECIDED = "undecided"


def verdict(sightings: list[Sighting], threshold: float) -> Verdict:
    """The verdict of a question from all its sightings, best first (one per frame of vision
    tokens in memory): see the module docstring."""
    if not sightings:
        return Verdict.NOT_SEEN
    if len(sightings) == 1:
        return Verdict.UNDECIDED
    return Verdict.SEEN if sightings[0].score >= threshold else Verdict.NOT_SEEN


@dataclass(frozen=True)
class FrameNote:
    """A frame in memory as the template sees it: ``frame_id``, ``stamp_s`` (stream seconds),
    ``camera``, ``label`` (what the family named in it; "" for a familiar frame), ``pose`` (where
    the robot was; None when unknown) and ``tracked`` (the stream matches poses to frames, so an
    unknown position is said)."""

    frame_id: int
    stamp_s: float
    camera: str
    label: str
    pose: Pose | None = None
    tracked: bool = False


@dataclass(frozen=True)
class Evidence:
    """What an answer rests on.

    Attributes:
        verdict: :class:`Verdict`.
        line: the memory line rendered into the prompt ("Memory: I saw a domestic cat at t=60 s.";
            "" when evidence is off).
        sentence: the same statement as a stand-alone answer ("I saw a domestic cat at t=60 s."),
            the answer when the model's text contradicts it.
        labels: the objects it names. times_s: the times (seconds) it states.
        yes_no: it answers whether an object the question names was seen (a "seen" or "not seen"
            line), so the text must say the same: name the object and a time it states, or say no
            (False for questions that name no object, time-window lists and undecided lines).
        places: the positions it states (``(x, y)`` metres, rounded as written); a "seen"
            answer must state one of them, and none other.
    """

    verdict: Verdict
    line: str
    sentence: str
    labels: tuple[str, ...] = ()
    times_s: tuple[float, ...] = ()
    yes_no: bool = False
    places: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Run:
    """Consecutive sightings of one object: first and last stamp (seconds), its best sighting."""

    start_s: float
    end_s: float
    best: Sighting


class AnswerTemplate:
    """The default answer template (any family). Subclass and override to change the wording;
    attributes are class-level settings.

    Attributes:
        system_prompt: the stream's first chunk (its tokens are the sinks).
        question_label: label of the question's copy after the memory line (without it a small
            model read the repeat as the operator asking again; bench/results/README.md, "Answers").
        run_gap_s: sightings of one object closer than this (seconds) are one run ("again" needs a gap).
        max_runs: most runs a memory line lists (its length stays bounded in tokens).
        max_window_frames: most frames a time-window line lists.
        time_tolerance_s: a stated time this close to one the evidence states agrees with it
            (the line rounds to whole seconds).
    """

    system_prompt = DEFAULT_SYSTEM_PROMPT
    question_label = "Question: "
    run_gap_s = 15.0
    max_runs = 4
    max_window_frames = 6
    time_tolerance_s = 1.0

    def frame_tag(self, stamp_s: float, camera: str) -> str:
        """The text tag of a frame stored at ``stamp_s`` seconds by ``camera``:
        ``<frame t=12.0s cam=front>``."""
        return f"{FRAME_TAG_OPEN} t={stamp_s:.1f}s cam={camera}>"

    def banned_openings(self) -> tuple[str, ...]:
        """Texts an answer may not write, as the decoder bans them: the frame tag's opening in its
        three usual cases (``<frame``, ``<Frame``, ``<FRAME``), at a line start and after a space."""
        word = FRAME_TAG_OPEN[1:]
        return tuple(sorted(f"{lead}<{case}" for case in (word, word.capitalize(), word.upper()) for lead in ("", " ")))

    # ---- verdict -------------------------------------------------------------------------
    def judge(
        self,
        question: str,
        sightings: list[Sighting],
        frames: dict[int, FrameNote],
        threshold: float,
        concepts: Callable[[str], frozenset[str] | None],
    ) -> tuple[Verdict, list[Sighting]]:
        """The verdict of ``question`` and its sightings reordered so that the evidence comes first
        (the module docstring's rule).

        Args:
            sightings: every frame of vision tokens in memory, best match first.
            frames: the frames in memory by id (their labels).
            threshold: the score rule's threshold.
            concepts: a label -> the words it is, or None (the family's ``label_concepts``).
        """
        asked = asked_object(question)
        known = [(x, concepts(self._label(x, frames))) for x in sightings]
        if asked is None or not any(c is not None for _, c in known):
            return verdict(sightings, threshold), sightings
        words = object_words(asked)
        match = [x for x, c in known if c is not None and words & c]
        if not match:
            return Verdict.NOT_SEEN, sightings
        return Verdict.SEEN, match + [x for x in sightings if x not in match]

    # ---- evidence ------------------------------------------------------------------------
    def runs(self, sightings: list[Sighting], frames: dict[int, FrameNote], threshold: float) -> list[Run]:
        """The runs of sightings of the best sighting's object, oldest first: the frames that
        carry the same label as the best (when the family names nothing, sightings at or above
        ``threshold``), merged when closer than :attr:`run_gap_s`."""
        if not sightings:
            return []
        label = self._label(sightings[0], frames)
        same = sorted(
            (x for x in sightings if (self._label(x, frames) == label if label else x.score >= threshold)),
            key=lambda x: x.stamp_s,
        )
        if sightings[0] not in same:
            same = sorted(same + [sightings[0]], key=lambda x: x.stamp_s)
        runs: list[Run] = []
        for x in same:
            if runs and x.stamp_s - runs[-1].end_s < self.run_gap_s:
                last = runs[-1]
                runs[-1] = Run(last.start_s, x.stamp_s, x if x.score > last.best.score else last.best)
            else:
                runs.append(Run(x.stamp_s, x.stamp_s, x))
        return runs

    def evidence(
        self,
        question: str,
        found: Verdict,
        sightings: list[Sighting],
        frames: dict[int, FrameNote],
        threshold: float,
        max_sightings: int,
        several_cameras: bool,
        near_radius_m: float = DEFAULT_NEAR_RADIUS_M,
    ) -> Evidence:
        """The :class:`Evidence` of a question.

        Args:
            question: the operator's question. found: its :func:`verdict`.
            sightings: every frame of vision tokens in memory, best match first.
            frames: the frames in memory by id (time-window questions list them).
            threshold: the seen threshold (score units). max_sightings: most sightings of other
                objects added to a "seen" line (the session's ``evidence_sightings``); 0 turns
                evidence off (an empty line and sentence).
            several_cameras: name the camera of each sighting.
            near_radius_m: radius (metres) of "What did you see near (x, y)?".
        """
        if max_sightings <= 0:
            return Evidence(found, "", "")
        near = _NEAR.search(question.lower())
        if near:
            return self._near(float(near.group(1)), float(near.group(2)), near_radius_m, frames, several_cameras)
        ev = self._evidence(question, found, sightings, frames, threshold, max_sightings, several_cameras)
        # only a question about an object is a yes-or-no one ("Describe the road." is not)
        return ev if asked_object(question) is not None else replace(ev, yes_no=False)

    def _evidence(
        self,
        question: str,
        found: Verdict,
        sightings: list[Sighting],
        frames: dict[int, FrameNote],
        threshold: float,
        max_sightings: int,
        several_cameras: bool,
    ) -> Evidence:
        q = question.lower()
        window = _WINDOW.search(q)
        if window:
            return self._window(window, frames, several_cameras)
        if found is Verdict.NOT_SEEN:
            if not sightings or len(sightings) < 2:
                return self._said(found, "no, no stored camera frame matches this question.")
            best = sightings[0]
            return self._said(
                found, f"no, the closest I saw was {self._where(best, frames, several_cameras)}.", [best], frames
            )
        if found is Verdict.UNDECIDED:
            best = sightings[0]
            return self._said(found, f"I saw {self._where(best, frames, several_cameras)}.", [best], frames)
        runs = self.runs(sightings, frames, threshold)
        what = self._label(sightings[0], frames)
        thing = with_article(what) if what else "a matching frame"
        if _COUNT.search(q):
            times = " and ".join(f"t={r.start_s:.0f} s" for r in runs[-self.max_runs :])
            count = "once" if len(runs) == 1 else f"{len(runs)} times"
            return self._said(
                found,
                f"I saw {thing} {count}, at {times}.",
                [r.best for r in runs],
                frames,
                [r.start_s for r in runs[-self.max_runs :]],
            )
        if _LAST.search(q):
            last = runs[-1]
            return self._said(
                found,
                f"I last saw {self._where(last.best, frames, several_cameras, last.start_s)}.",
                [last.best],
                frames,
                [last.start_s],
            )
        shown = runs[: self.max_runs]
        parts = [self._where(shown[0].best, frames, several_cameras, shown[0].start_s)]
        parts += [f"again at t={r.start_s:.0f} s{self._position(frames.get(r.best.frame_id))}" for r in shown[1:]]
        others = [x for x in sightings[1:] if x.score >= threshold and self._label(x, frames) != what]
        parts += [self._where(x, frames, several_cameras) for x in others[: max_sightings - 1]]
        said = [r.best for r in shown] + others[: max_sightings - 1]
        return self._said(
            found,
            f"I saw {' and '.join(parts[: len(shown)])}" + "".join(f", {p}" for p in parts[len(shown) :]) + ".",
            said,
            frames,
            [r.start_s for r in shown] + [x.stamp_s for x in others[: max_sightings - 1]],
        )

    def _window(self, match: re.Match, frames: dict[int, FrameNote], several: bool) -> Evidence:
        """The frames in memory between the two times of a "between A and B" question."""
        (lead_a, a, unit_a, lead_b, b, unit_b) = match.groups()
        minutes = any(u and u.startswith("m") for u in (unit_a, unit_b)) or any(
            lead and lead.startswith("min") for lead in (lead_a, lead_b)
        )
        lo, hi = sorted(float(x) * (60.0 if minutes else 1.0) for x in (a, b))
        span = f"between t={lo:.0f} s and t={hi:.0f} s"
        notes = sorted(frames.values(), key=lambda n: n.stamp_s)
        inside = [n for n in notes if lo <= n.stamp_s <= hi]
        if not notes:
            return self._listed(f"I remember no frame {span}; no frame is in memory.")
        held = f"memory holds t={notes[0].stamp_s:.0f} s to t={notes[-1].stamp_s:.0f} s"
        if not inside:
            return self._listed(f"I remember no frame {span} ({held}).")
        named = [n for n in inside if n.label]
        if not named:
            return self._listed(
                f"{span} I saw nothing new ({len(inside)} frames of the usual scene).", times=(inside[0].stamp_s,)
            )
        listed = named[: self.max_window_frames]
        parts = [self._place(n.label, n.stamp_s, n.camera, several, self._position(n)) for n in listed]
        more = f" and {len(named) - len(listed)} more" if len(named) > len(listed) else ""
        return self._listed(
            f"{span} I saw {', '.join(parts)}{more}.", tuple(n.label for n in listed), tuple(n.stamp_s for n in listed)
        )

    def _near(self, x: float, y: float, radius_m: float, frames: dict[int, FrameNote], several: bool) -> Evidence:
        """The frames in memory whose pose lies within ``radius_m`` of ``(x, y)``, oldest first."""
        where = f"within {radius_m:g} m of ({x:g}, {y:g})"
        located = [n for n in sorted(frames.values(), key=lambda n: n.stamp_s) if n.pose is not None]
        if not located:
            return self._listed("I know no positions: no stored frame in memory has a pose.")
        inside = [n for n in located if n.pose.distance_to(x, y) <= radius_m]
        if not inside:
            closest = min(located, key=lambda n: n.pose.distance_to(x, y))
            return self._listed(
                f"I remember no frame {where}; the closest was "
                f"{self._place(closest.label, closest.stamp_s, closest.camera, several, self._position(closest))}.",
                (closest.label,) if closest.label else (),
                (closest.stamp_s,),
            )
        named = [n for n in inside if n.label] or inside
        listed = named[: self.max_window_frames]
        parts = [self._place(n.label, n.stamp_s, n.camera, several, self._position(n)) for n in listed]
        more = f" and {len(named) - len(listed)} more" if len(named) > len(listed) else ""
        return self._listed(
            f"{where} I saw {', '.join(parts)}{more}.",
            tuple(n.label for n in listed if n.label),
            tuple(n.stamp_s for n in listed),
        )

    def _listed(self, statement: str, labels: tuple[str, ...] = (), times: tuple[float, ...] = ()) -> Evidence:
        """Evidence of a time-window question: a list, no yes or no (its verdict is "undecided")."""
        return self._stated(Verdict.UNDECIDED, statement, labels, times, yes_no=False)

    def _label(self, x: Sighting, frames: dict[int, FrameNote]) -> str:
        note = frames.get(x.frame_id)
        return note.label if note else ""

    @staticmethod
    def _place(label: str, stamp_s: float, camera: str, several: bool, position: str = "") -> str:
        """ "a domestic cat at t=60 s", with " (rear camera)" once the stream has several cameras,
        then ``position`` (:meth:`_position`)."""
        return (
            f"{with_article(label) if label else 'a matching frame'} at t={stamp_s:.0f} s"
            + (f" ({camera} camera)" if several and camera else "")
            + position
        )

    @staticmethod
    def _position(note: FrameNote | None) -> str:
        """ ", near (12.3, -4.1) in map" for a frame with a pose, ", position unknown" for one
        without while the stream tracks poses, "" otherwise."""
        if note is None or not note.tracked:
            return ""
        if note.pose is None:
            return ", position unknown"
        p = note.pose
        return f", near ({p.x:.1f}, {p.y:.1f})" + (f" in {p.frame_id}" if p.frame_id else "")

    def _where(self, x: Sighting, frames: dict[int, FrameNote], several: bool, stamp_s: float | None = None) -> str:
        return self._place(
            self._label(x, frames),
            x.stamp_s if stamp_s is None else stamp_s,
            x.camera,
            several,
            self._position(frames.get(x.frame_id)),
        )

    @staticmethod
    def _stated(
        found: Verdict, statement: str, labels: tuple[str, ...], times_s: tuple[float, ...], yes_no: bool
    ) -> Evidence:
        """Evidence whose memory line is "Memory: " + ``statement`` and whose sentence is the
        statement capitalised."""
        return Evidence(
            found,
            f"Memory: {statement}",
            statement[0].upper() + statement[1:],
            labels,
            times_s,
            yes_no,
            places_in(statement),
        )

    def _said(
        self,
        found: Verdict,
        statement: str,
        said: list[Sighting] = (),
        frames: dict[int, FrameNote] = None,
        times: list[float] | None = None,
    ) -> Evidence:
        """Evidence of a verdict (:meth:`_stated`) naming the labels and times of ``said``."""
        labels = tuple(dict.fromkeys(lab for x in said if (lab := self._label(x, frames or {}))))
        times_s = tuple(times if times is not None else [x.stamp_s for x in said])
        return self._stated(found, statement, labels, times_s, yes_no=found is not Verdict.UNDECIDED)

    # ---- the answer against its evidence -------------------------------------------------
    def check(self, text: str, evidence: Evidence, vocabulary: set[str]) -> list[str]:
        """How ``text`` contradicts ``evidence`` (empty: it does not).

        Args:
            text: the model's answer. evidence: what it was generated from.
            vocabulary: labels of the frames in memory (objects the text could name).
        """
        if not evidence.line:
            return []
        problems = []
        if _STRUCTURE.search(text):
            problems.append("writes a frame tag or chat markup")
        lower = text.lower()
        stated = answer_times(lower)
        wrong = [t for t in stated if all(abs(t - e) > self.time_tolerance_s for e in evidence.times_s)]
        if wrong:
            problems.append(f"states t={wrong[0]:.0f} s, which the evidence does not")
        named = sorted(
            lab
            for lab in vocabulary
            if lab
            and lab not in evidence.labels
            and re.search(rf"\b{re.escape(lab.lower())}\b", lower)
            and not any(lab.lower() in e.lower() for e in evidence.labels)
        )
        if named:
            problems.append(f"names {named[0]!r}, which the evidence does not")
        if not evidence.yes_no:  # a list (a time window): every object it names must be named
            missing = [lab for lab in evidence.labels if not _names(lower, _label_words(lab))]
            if missing:
                problems.append(f"leaves out {missing[0]!r}, which the evidence lists")
            return problems
        denies = is_clear_no(text)
        said = places_in(text)
        if any(p not in evidence.places for p in said):
            problems.append(f"states a position ({said[0][0]:g}, {said[0][1]:g}) the evidence does not")
        if evidence.verdict is Verdict.SEEN:
            if denies:
                problems.append("denies what the evidence affirms")
            if evidence.places and not said:
                problems.append("states no position, where the evidence does")
            words = [w for lab in evidence.labels for w in _label_words(lab)]
            if words and not _names(lower, words):
                problems.append(f"does not name {evidence.labels[0]!r}, what the evidence saw")
            if evidence.times_s and not any(
                abs(t - e) <= self.time_tolerance_s for t in stated for e in evidence.times_s
            ):
                problems.append("states none of the evidence's times")
        elif not denies:
            problems.append("does not say no, as the evidence does")
        return problems

    def settle(self, text: str, evidence: Evidence, vocabulary: set[str]) -> tuple[str, str, list[str]]:
        """``(answer, source, problems)``: the model's text (``source`` "model") unless it
        contradicts the evidence (:meth:`check`), then the evidence sentence (``source``
        "evidence"). An empty text with evidence is answered by the evidence too."""
        problems = self.check(text, evidence, vocabulary)
        if evidence.sentence and (problems or not text.strip()):
            return evidence.sentence, "evidence", problems or ["empty answer"]
        return text, "model", problems


class EmbeddedAnswerTemplate(AnswerTemplate):
    """The embedded demo's template (SmolLM2-135M on the dashcam drives): the memory line is
    written as the answer it supports and the question repeated after it, labelled, which is what
    that small model repeats best (bench/results/README.md, "Answers"); its system prompt names the
    robot car of the demo."""

    system_prompt = (
        "You are the visual memory of a robot car. Camera frames arrive as <frame t=SECONDS cam=NAME> "
        "followed by what the camera saw. Answer the operator briefly, naming what was seen and when."
    )


#: Model family (``VisionLanguageModel.family``) -> its template class; other families get
#: :class:`AnswerTemplate`. A family with its own wording is one subclass and one entry here.
TEMPLATES: dict[str, type[AnswerTemplate]] = {"embedded": EmbeddedAnswerTemplate}


def template_for(family: str) -> AnswerTemplate:
    """The answer template of a model family (:data:`TEMPLATES`, else the default)."""
    return TEMPLATES.get(family, AnswerTemplate)()
