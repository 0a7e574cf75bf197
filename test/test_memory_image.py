"""What the memory image shows: exactly the frames that hold KV slots, with bounded thumbnails."""

import math

from skimage.data import chelsea

from infmllm_ros.bench.drive import synthetic_road
from infmllm_ros.ros.memory_image import CAPTION_H, mosaic
from infmllm_ros.runtime.session import THUMBNAIL_PRUNE_EVERY, THUMBNAIL_SIZE, StreamSession


def test_the_memory_image_shows_the_frames_in_the_cache_and_forgets_evicted_thumbnails(embedded):
    # streaming_llm drops whole old frames (inf_mllm keeps some slots of nearly every frame)
    s = StreamSession(embedded, capacity=256, policy="streaming_llm", recent=64, max_chunk=64, familiar_interval_s=0.0)
    for t in range(120):
        s.ingest_frame(chelsea() if t == 115 else synthetic_road(t), float(t))
    frames = s.memory_frames()
    ids, stamps = s.cache.frames()
    assert [f.frame_id for f in frames] == ids and [f.stamp_s for f in frames] == stamps
    assert s.cache.evicted_tokens > 0 and len(ids) < 120  # eviction happened: old frames are gone
    assert len(s._thumbs) <= len(ids) + THUMBNAIL_PRUNE_EVERY
    cat = next(f for f in frames if f.stamp_s == 115.0)
    assert cat.label == "domestic cat" and cat.thumbnail.shape == (THUMBNAIL_SIZE[1], THUMBNAIL_SIZE[0], 3)
    assert all(f.slots > 0 for f in frames)
    img = mosaic(frames, columns=8)
    w, h = THUMBNAIL_SIZE
    assert img.shape == (math.ceil(len(frames) / 8) * (h + CAPTION_H), 8 * w, 3)
    i = [f.frame_id for f in frames].index(cat.frame_id)
    y, x = (i // 8) * (h + CAPTION_H), (i % 8) * w
    assert (img[y : y + h, x : x + w] == cat.thumbnail).all()
