"""Answers held to their evidence (runtime/answer.py): the verdict never says seen without
evidence, the memory line states every run of sightings, the closest frame of a "no", and the
latest run, the count or a time window when asked; a text that contradicts its evidence is
replaced by the evidence sentence; a family's template is one class."""

import pytest

from infmllm_ros.runtime.answer import (
    TEMPLATES,
    AnswerTemplate,
    EmbeddedAnswerTemplate,
    Evidence,
    FrameNote,
    Verdict,
    template_for,
    verdict,
)
from infmllm_ros.runtime.recall import Sighting

T = AnswerTemplate()
CAT, ROAD = "domestic cat", ""
NOTES = {
    0: FrameNote(0, 10.0, "front", CAT),
    1: FrameNote(1, 11.0, "front", CAT),
    2: FrameNote(2, 40.0, "front", ROAD),
    3: FrameNote(3, 2460.0, "front", CAT),
    4: FrameNote(4, 300.0, "front", "espresso"),
}


def sightings(*scored):
    return [Sighting(f, NOTES[f].stamp_s, score, "front") for f, score in scored]


def evidence(question, found, xs, max_sightings=1):
    return T.evidence(question, found, xs, NOTES, 0.24, max_sightings, False)


def test_the_verdict_is_never_seen_without_evidence_to_compare():
    assert verdict([], 0.24) is Verdict.NOT_SEEN
    assert verdict(sightings((0, 0.0)), 0.24) is Verdict.UNDECIDED  # one frame: its contrast is 0
    assert verdict(sightings((0, 0.3), (2, 0.0)), 0.24) is Verdict.SEEN
    assert verdict(sightings((0, 0.2), (2, 0.0)), 0.24) is Verdict.NOT_SEEN
    undecided = evidence("Was there a giraffe?", Verdict.UNDECIDED, sightings((0, 0.0)))
    assert undecided.line == "Memory: I saw a domestic cat at t=10 s."


def test_every_run_of_sightings_is_stated_with_consecutive_frames_merged():
    xs = sightings((3, 0.5), (0, 0.45), (1, 0.4), (4, 0.3), (2, 0.0))
    seen = evidence("Was there a cat?", Verdict.SEEN, xs)
    assert seen.line == "Memory: I saw a domestic cat at t=10 s and again at t=2460 s."
    assert seen.sentence == "I saw a domestic cat at t=10 s and again at t=2460 s."
    assert seen.times_s == (10.0, 2460.0) and seen.labels == (CAT,)
    # another object above the threshold joins when more sightings are asked for
    assert evidence("Was there a cat?", Verdict.SEEN, xs, 2).line.endswith("again at t=2460 s, an espresso at t=300 s.")


def test_last_count_and_time_window_questions():
    xs = sightings((3, 0.5), (0, 0.45), (1, 0.4), (4, 0.3), (2, 0.0))
    assert (
        evidence("When did you last see a cat?", Verdict.SEEN, xs).sentence == "I last saw a domestic cat at t=2460 s."
    )
    assert (
        evidence("How many times did you see a cat?", Verdict.SEEN, xs).sentence
        == "I saw a domestic cat 2 times, at t=10 s and t=2460 s."
    )
    window = evidence("What did you see between minute 4 and minute 6?", Verdict.SEEN, xs)
    assert window.sentence == "Between t=240 s and t=360 s I saw an espresso at t=300 s." and window.times_s == (300.0,)
    assert not window.yes_no and T.settle("I saw an espresso at t=300 s.", window, {CAT, "espresso"})[1] == "model"
    assert window.verdict is Verdict.UNDECIDED  # a list answers no yes-or-no question
    two = evidence("What did you see between t=0 s and t=400 s?", Verdict.SEEN, xs)
    assert T.settle("I saw an espresso at t=300 s.", two, {CAT, "espresso"})[2] == [
        "leaves out 'domestic cat', which the evidence lists"
    ]
    assert (
        evidence("What did you see between t=20 s and t=50 s?", Verdict.SEEN, xs).sentence
        == "Between t=20 s and t=50 s I saw nothing new (1 frames of the usual scene)."
    )
    outside = evidence("What did you see between minute 60 and minute 70?", Verdict.SEEN, xs)
    assert outside.sentence == "I remember no frame between t=3600 s and t=4200 s (memory holds t=10 s to t=2460 s)."
    assert (
        T.evidence("What did you see between 1 and 2 minutes?", Verdict.NOT_SEEN, [], {}, 0.24, 1, False).sentence
        == "I remember no frame between t=60 s and t=120 s; no frame is in memory."
    )


def test_a_near_miss_is_a_no_that_names_the_closest_frame():
    no = evidence("Was there a dog?", Verdict.NOT_SEEN, sightings((0, 0.1), (2, 0.0)))
    assert no.line == "Memory: no, the closest I saw was a domestic cat at t=10 s."
    assert (
        evidence("Was there a dog?", Verdict.NOT_SEEN, []).line
        == "Memory: no, no stored camera frame matches this question."
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<Frame t=20.1s cam=front> I saw a domestic cat at t=20 s.", "frame tag"),
        ("\u2039frame t=20.0s cam=front\u203a Nothing new.", "frame tag"),
        ("I saw a domestic cat at t=30 s.", "states t=30 s"),
        ("I saw an espresso at t=20 s.", "names 'espresso'"),
        ("No, I did not see a cat.", "denies"),
        ("The answer is: 20 s.", "does not name 'domestic cat'"),
        ("I saw a domestic cat.", "states none of the evidence's times"),
    ],
)
def test_a_text_that_contradicts_a_seen_verdict_is_replaced_by_the_evidence(text, problem):
    ev = Evidence(
        Verdict.SEEN,
        "Memory: I saw a domestic cat at t=20 s.",
        "I saw a domestic cat at t=20 s.",
        (CAT,),
        (20.0,),
        yes_no=True,
    )
    answer, source, problems = T.settle(text, ev, {CAT, "espresso"})
    assert (answer, source) == ("I saw a domestic cat at t=20 s.", "evidence") and problem in "; ".join(problems)
    assert T.settle("The cat was there at 20 s.", ev, {CAT, "espresso"}) == ("The cat was there at 20 s.", "model", [])


def test_a_text_that_does_not_say_no_to_a_no_is_replaced_and_a_plain_no_is_kept():
    ev = evidence("Was there a dog?", Verdict.NOT_SEEN, sightings((0, 0.1), (2, 0.0)))
    assert T.settle("I saw a domestic cat at t=10 s.", ev, {CAT})[1:] == (
        "evidence",
        ["does not say no, as the evidence does"],
    )
    assert T.settle("The closest I could find was a domestic cat at t=10 s.", ev, {CAT})[1] == "evidence"
    assert T.settle("No, there was no dog.", ev, {CAT}) == ("No, there was no dog.", "model", [])
    assert T.settle("", ev, {CAT})[:2] == ("No, the closest I saw was a domestic cat at t=10 s.", "evidence")
    off = Evidence(Verdict.NOT_SEEN, "", "")
    assert T.settle("I saw a giraffe at t=3 s.", off, {CAT}) == ("I saw a giraffe at t=3 s.", "model", [])


def test_a_family_template_is_one_class_and_the_embedded_demo_keeps_its_own():
    class Terse(AnswerTemplate):
        question_label = "Q: "

    assert isinstance(template_for("embedded"), EmbeddedAnswerTemplate)
    assert type(template_for("qwen2_5_vl")) is AnswerTemplate
    TEMPLATES["terse_family"] = Terse
    try:
        assert template_for("terse_family").question_label == "Q: "
    finally:
        del TEMPLATES["terse_family"]
    assert "robot car" in EmbeddedAnswerTemplate.system_prompt and "robot car" not in AnswerTemplate.system_prompt


def test_over_a_stream_the_repeated_event_and_the_single_frame_are_answered_from_memory(embedded):
    """Session level, embedded model: with one photo among road frames, "What did you see?" is
    undecided and a giraffe is not seen (no frame's label is one);
    the cat shown twice among other photos gets both times, its count and its last time; a stated time outside
    the evidence never survives."""
    from skimage.data import chelsea, coffee, rocket

    from infmllm_ros.bench.drive import synthetic_road
    from infmllm_ros.runtime.session import StreamSession

    s = StreamSession(embedded, capacity=1024, familiar_interval_s=0.0)
    for t in range(6):
        s.ingest_frame(chelsea() if t == 3 else synthetic_road(t), float(t))
    one = s.ask("What did you see?", max_new_tokens=16, keep_in_context=False)  # no object named: the score rule
    assert (one.verdict, one.seen, one.confidence) == ("undecided", False, 0.5)
    giraffe = s.ask("Was there a giraffe?", max_new_tokens=16, keep_in_context=False)  # no frame is one
    assert (giraffe.verdict, giraffe.seen) == ("not seen", False) and giraffe.text.lower().startswith("no")
    photos = {12: coffee(), 20: rocket(), 30: chelsea()}  # a match is a contrast with the other photos
    for t in range(6, 40):
        s.ingest_frame(photos.get(t, synthetic_road(t)), float(t))
    both = s.ask("Was there a cat? At what time?", max_new_tokens=24, keep_in_context=False)
    assert both.verdict == "seen" and both.evidence == "Memory: I saw a domestic cat at t=3 s and again at t=30 s."
    assert (
        s.ask("How many times did you see a cat?", max_new_tokens=24, keep_in_context=False).evidence
        == "Memory: I saw a domestic cat 2 times, at t=3 s and t=30 s."
    )
    last = s.ask("When did you last see a cat?", max_new_tokens=24, keep_in_context=False)
    assert last.evidence == "Memory: I last saw a domestic cat at t=30 s."
    from infmllm_ros.runtime.answer import answer_times

    for a in (one, giraffe, both, last):  # no answer states a time its memory line does not
        assert all(any(abs(t - e) <= 1 for e in answer_times(a.evidence)) for t in answer_times(a.text)), a


def test_an_asked_object_is_seen_exactly_when_a_frame_label_is_one():
    """The verdict by what labels are (WordNet via the family's label_concepts), whatever the
    scores: a Silky Terrier is a dog, an espresso a coffee, a cat never a dog."""
    from infmllm_ros.runtime.answer import asked_object

    concepts = {
        CAT: frozenset({"domestic cat", "cat", "feline", "animal"}),
        "espresso": frozenset({"espresso", "coffee", "beverage"}),
    }.get
    xs = sightings((0, 0.1), (4, 0.05), (2, 0.0))  # low scores: a new scene's scale
    assert T.judge("Was there a dog? At what time?", xs, NOTES, 0.24, concepts) == (Verdict.NOT_SEEN, xs)
    found, ordered = T.judge("Did you see any coffee?", xs, NOTES, 0.24, concepts)
    assert found is Verdict.SEEN and ordered[0].frame_id == 4 and set(ordered) == set(xs)
    assert T.judge("What animals did you see?", xs, NOTES, 0.24, concepts)[0] is Verdict.SEEN
    assert T.judge("What did you see?", xs, NOTES, 0.24, concepts)[0] is Verdict.NOT_SEEN  # score rule
    assert T.judge("Was there a dog?", xs, NOTES, 0.24, lambda label: None)[0] is Verdict.NOT_SEEN  # no knowledge
    assert T.judge("Was there a cat?", xs, NOTES, 0.24, lambda label: None)[0] is Verdict.NOT_SEEN  # score rule
    assert [
        asked_object(q)
        for q in (
            "Was there a scuba diver at the pool?",
            "Did you see any red cars today?",
            "When did you last see the cat?",
            "What did you see?",
        )
    ] == ["scuba diver", "red cars", "cat", None]


def test_embedded_labels_know_what_they_are(embedded):
    assert {"cat", "feline", "animal"} <= embedded.label_concepts("domestic cat")
    assert "coffee" in embedded.label_concepts("espresso") and "dog" in embedded.label_concepts("Silky Terrier")
    assert "dog" not in embedded.label_concepts("domestic cat") and embedded.label_concepts("") is None


def test_a_question_that_names_no_object_is_not_held_to_a_yes_or_no():
    no = evidence("Describe the road.", Verdict.NOT_SEEN, [])
    assert no.line == "Memory: no, no stored camera frame matches this question." and not no.yes_no
    assert T.settle("The road is straight.", no, {CAT}) == ("The road is straight.", "model", [])
    assert T.settle("I saw a cat at t=5 s.", no, {CAT})[1] == "evidence"  # a time the evidence does not state
    assert evidence("Was there a road?", Verdict.NOT_SEEN, []).yes_no
