"""Memory on disk: a stream saved and loaded into a fresh session answers as the original would,
a file from another stream or cut short is refused with the reason, and a save killed half-way
leaves the previous file whole."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from skimage.data import chelsea, coffee

from infmllm_ros.bench.drive import synthetic_road
from infmllm_ros.runtime.memory_file import MemoryFileRefused
from infmllm_ros.runtime.session import StreamSession


def session(model, **kw):
    return StreamSession(
        model,
        **{"capacity": 256, "policy": "inf_mllm", "recent": 64, "max_chunk": 64, "familiar_interval_s": 2.0, **kw},
    )


def drive(s):
    """40 frames, two photos, enough to evict (256 slots)."""
    for t in range(40):
        s.ingest_frame(
            chelsea() if t == 5 else coffee() if t == 30 else synthetic_road(t),
            float(t),
            "rear" if t % 7 == 0 else "front",
        )


def test_a_loaded_stream_answers_and_goes_on_exactly_as_the_saved_one(embedded, tmp_path):
    a = session(embedded)
    drive(a)
    assert a.cache.evicted_tokens > 0
    a.save_memory(tmp_path / "m.safetensors", extra={"origin_s": 1.7e9})
    b = session(embedded)
    b.ingest_frame(coffee(), 0.0, "front")  # a stream of its own, replaced by the load
    assert b.load_memory(tmp_path / "m.safetensors") == {"origin_s": 1.7e9}
    assert all(f.thumbnail is None for f in b.memory_frames())  # none of b's own thumbnails survive
    n = a.cache.length
    for name in ("k", "v", "position", "kind", "frame", "stamp", "scores"):
        x, y = getattr(a.cache, name)[:, :, :n], getattr(b.cache, name)[:, :, :n]
        assert torch.equal(x.nan_to_num(-1.0), y.nan_to_num(-1.0)) and torch.equal(x.isnan(), y.isnan()), name
    for s in (a, b):  # the stream goes on the same way: stamps, novelty, familiar interval, eviction
        s.ingest_frame(synthetic_road(40), 40.0, "front")
        s.ingest_frame(chelsea(), 41.0, "rear")
    qa, qb = (s.ask("Was there a cat? At what time?", max_new_tokens=16) for s in (a, b))
    assert qa.text == qb.text and qa.sightings == qb.sightings and qa.evidence == qb.evidence
    with pytest.raises(ValueError, match="older than camera 'front'"):
        b.ingest_frame(synthetic_road(1), 39.0, "front")


def test_a_file_from_another_stream_or_cut_short_is_refused_and_changes_nothing(embedded, tmp_path):
    a = session(embedded)
    drive(a)
    path = tmp_path / "m.safetensors"
    a.save_memory(path)
    other = session(embedded, capacity=320)
    before = other.cache.length
    with pytest.raises(MemoryFileRefused, match=r"another stream \(capacity: 256 != 320\)") as refused:
        other.load_memory(path)
    assert refused.value.reason == "other-stream" and refused.value.path == path
    with pytest.raises(ValueError, match="system_prompt"):
        session(embedded, system_prompt="You watch a warehouse.").load_memory(path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MemoryFileRefused, match="cut short") as refused:
        other.load_memory(cut)
    assert refused.value.reason == "unreadable"
    with pytest.raises(FileNotFoundError):
        other.load_memory(tmp_path / "none.safetensors")
    assert other.cache.length == before and other.frames_ingested == 0


SAVER = """
import sys
from infmllm_ros.models import load_model
from infmllm_ros.bench.drive import synthetic_road
from infmllm_ros.runtime.session import StreamSession
s = StreamSession(load_model("smollm2-135m"), capacity=256, recent=64, max_chunk=64, familiar_interval_s=2.0)
s.ingest_frame(synthetic_road(0), 0.0)
print("saving", flush=True)
while True:
    s.save_memory(sys.argv[1])
"""


def test_kill_9_during_saves_leaves_a_whole_file(tmp_path):
    from infmllm_ros.models import load_model

    model = load_model("smollm2-135m")  # the saver's model, so the file's identity matches
    path = tmp_path / "m.safetensors"
    a = session(model)
    a.ingest_frame(synthetic_road(0), 0.0)
    a.save_memory(path)
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
    assert "saving\n" in iter(saver.stdout.readline, "")  # after the model's own start-up lines
    time.sleep(1.5)  # dozens of saves, one of them in flight
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    b = session(model)
    b.load_memory(path)
    assert b.cache.length == a.cache.length and b.frames_ingested == 1


def test_a_save_never_replaces_a_file_that_is_not_a_memory_of_this_stream(embedded, tmp_path):
    a = session(embedded)
    a.ingest_frame(synthetic_road(0), 0.0)
    victim = tmp_path / "victim.txt"
    victim.write_text("someone's notes")
    other = tmp_path / "other.safetensors"
    session(embedded, capacity=320).save_memory(other)
    other_bytes = other.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(other_bytes[:100])
    for path, why in ((victim, "cannot read memory file"), (other, "from another stream"), (cut, "cut short")):
        with pytest.raises(FileExistsError, match=why):
            a.save_memory(path)
    assert victim.read_text() == "someone's notes" and other.read_bytes() == other_bytes
    assert cut.read_bytes() == other_bytes[:100]
    with pytest.raises(FileExistsError, match="not a file"):
        a.save_memory(tmp_path)
    with pytest.raises(FileNotFoundError):  # no folder is created
        a.save_memory(tmp_path / "new" / "m.safetensors")
    a.save_memory(tmp_path / "m.safetensors")
    a.save_memory(tmp_path / "m.safetensors")  # its own memory file is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cut.safetensors",
        "m.safetensors",
        "other.safetensors",
        "victim.txt",
    ]
