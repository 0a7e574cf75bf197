"""Sightings from the KV cache: the frame whose vision tokens match the question, and only
frames the policy kept. A tiny random LLaMA: at layer 0 a value depends only on its token, so a
question repeating a frame's vision token matches that frame exactly."""

import pytest
import torch

from infmllm_ros.kvcache import SlotKind, make_policy
from infmllm_ros.runtime.recall import find_sightings

TEXT, VISION = int(SlotKind.TEXT), int(SlotKind.VISION)


def stream_frames(dec, cache, frames: int):
    """System chunk, then per frame a chunk ``tag tag vis vis`` with vision tokens 10+2f, 11+2f."""
    dec(dec.embed(torch.arange(4)), cache, SlotKind.SINK)
    kinds = torch.tensor([TEXT, TEXT, VISION, VISION], dtype=torch.int8)
    for f in range(frames):
        ids = torch.tensor([1, 2, 10 + 2 * f, 11 + 2 * f])
        dec(dec.embed(ids), cache, kinds, frame_id=f, stamp_s=100.0 + 5 * f)


def ask(dec, cache, ids):
    dec(dec.embed(torch.tensor(ids)), cache)
    return find_sightings(cache, len(ids), layer=0)


def test_the_frame_showing_the_question_word_is_found_with_its_stamp(tiny):
    cache = tiny.new_cache(128, 8, make_policy("full"))
    stream_frames(tiny, cache, 6)
    assert cache.kind[0, 0, 4:8].tolist() == [TEXT, TEXT, VISION, VISION]
    found = ask(tiny, cache, [1, 2, 15, 3])  # token 15: frame 2's second vision token
    assert [s.frame_id for s in found][:1] == [2] and found[0].stamp_s == 110.0
    assert len(found) == 3 and found[0].score > found[1].score >= found[2].score
    assert len(find_sightings(cache, 4, layer=0, top=10)) == 6  # one per frame in context


def test_an_evicted_frame_cannot_be_sighted(tiny):
    cache = tiny.new_cache(24, 8, make_policy("streaming_llm", sinks=4, recent=8))
    stream_frames(tiny, cache, 8)  # 36 tokens into 24 slots: frames 0..2 are gone
    held = set(cache.frame[0, 0, : cache.length].tolist())
    assert 0 not in held and 7 in held
    found = ask(tiny, cache, [10, 11])  # frame 0's own vision tokens
    assert found and all(s.frame_id in held for s in found)
    assert ask(tiny, cache, [24, 25])[0].frame_id == 7  # the newest frame's tokens still match it


def test_no_vision_in_context_and_bad_arguments(tiny):
    cache = tiny.new_cache(64, 8, make_policy("full"))
    tiny(tiny.embed(torch.arange(4)), cache, SlotKind.SINK)
    assert ask(tiny, cache, [1, 2]) == []
    for kw, msg in (
        (dict(query_tokens=0, layer=0), "query_tokens"),
        (dict(query_tokens=99, layer=0), "query_tokens"),
        (dict(query_tokens=1, layer=3), "layer"),
        (dict(query_tokens=1, layer=0, top=0), "top"),
    ):
        with pytest.raises(ValueError, match=msg):
            find_sightings(cache, **kw)
    with pytest.raises(ValueError, match="per-token kinds"):
        tiny(tiny.embed(torch.arange(4)), cache, torch.zeros(3, dtype=torch.int8))
    assert cache.length == 6 and cache.pending == 0  # the bad chunk left nothing behind
