"""A stream's memory on disk: the KV buffer and everything a session needs to go on after a restart.

One ``safetensors`` file: the occupied slots of every cache tensor (K, V, positions, kinds, frame
ids, stamps, carried scores, M-RoPE lags) and each camera's novelty background as tensors; the
rest as JSON in the file's metadata under ``"infmllm"``: the format version, the identity of the
stream (model, family, KV dtype, shape, capacity, slack, max chunk, policy, a hash of the system
prompt's token ids) and its state (counters, clocks, per-frame camera and label, ``extra``
from the caller, e.g. the node's stamp origin).

A file is written atomically: to a temporary file beside it, flushed and fsynced, then renamed
over the old one and the folder fsynced, so a crash (even ``kill -9``) during a save leaves the
previous file whole. A file whose identity differs from the session's is refused with the fields
that differ; a file cut short or not ours is refused by what ``safetensors`` reports.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

#: Bumped when the layout changes; a file of another version is refused.
FORMAT_VERSION = 1
CACHE_TENSORS = ("k", "v", "position", "kind", "frame", "stamp", "scores", "rope_lag")


def identity(session) -> dict:
    """What must match for a memory file to be loaded into ``session`` (JSON-ready)."""
    cache = session.cache
    layers, kv_heads, _, head_dim = cache.k.shape
    return {"format": FORMAT_VERSION, "model": session.model.name, "family": session.model.family,
            "kv_dtype": str(cache.k.dtype).removeprefix("torch."), "layers": layers, "kv_heads": kv_heads,
            "head_dim": head_dim, "capacity": cache.capacity, "slack": cache.slack, "max_chunk": cache.max_chunk,
            "policy": cache.policy.name,
            "system_prompt": hashlib.sha256(json.dumps(session._system_ids).encode()).hexdigest()[:16]}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def save_memory(session, path: str | Path, extra: dict | None = None) -> int:
    """Write ``session``'s memory to ``path`` atomically; returns the file's size in bytes.

    Call with the session idle or from the thread that runs it (the node's worker): the state is
    read under the session's lock.

    Raises:
        OSError: the folder cannot be written (the old file, if any, is untouched).
    """
    path = Path(path)
    cache = session.cache
    with session._lock:
        snap = cache.snapshot()
        names = [n for n in CACHE_TENSORS if getattr(cache, n) is not None]
        tensors = {f"cache.{n}": t.contiguous().cpu() for n, t in zip(names, snap["tensors"])}
        for i, (camera, bg) in enumerate(session.scene._background.items()):
            tensors[f"scene.{i}"] = bg.contiguous().cpu()
        length, stream_tokens, evicted, offset = snap["counters"]
        state = {"length": length, "stream_tokens": stream_tokens, "evicted_tokens": evicted,
                 "position_offset": offset, "frames_ingested": session.frames_ingested,
                 "last_stamp_s": _finite(session.last_stamp_s), "camera_stamps": session.camera_stamps,
                 "last_stored_s": session._last_stored_s, "scene_cameras": list(session.scene._background),
                 "frame_info": {str(f): list(v) for f, v in session._frame_info.items()}}
    meta = {"identity": identity(session), "state": state, "extra": extra or {}}
    blob = save(tensors, metadata={"infmllm": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return len(blob)


def load_memory(session, path: str | Path) -> dict:
    """Replace ``session``'s memory with the one in ``path``; returns the file's ``extra``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that is cut short, not a memory file, of another format version, or
            from another stream (the message lists each differing field as ``name: file != this``).
            The session is unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["infmllm"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors and json raise several types for a bad file
        raise ValueError(f"cannot read memory file {path}: {type(exc).__name__}: {exc} "
                         "(cut short, or not written by save_memory)") from None
    want = identity(session)
    have = meta.get("identity", {})
    differ = [f"{k}: {have.get(k)!r} != {v!r}" for k, v in want.items() if have.get(k) != v]
    if differ:
        raise ValueError(f"memory file {path} is from another stream ({'; '.join(differ)})")
    state = meta["state"]
    cache = session.cache
    names = [n for n in CACHE_TENSORS if getattr(cache, n) is not None]
    length = state["length"]
    saved = [tensors[f"cache.{n}"] for n in names]
    if any(t.shape[:2] != getattr(cache, n).shape[:2] or t.shape[2] != length for n, t in zip(names, saved)):
        raise ValueError(f"memory file {path} has tensors that do not fit its own header")
    with session._lock:
        cache.restore({"tensors": [t.to(getattr(cache, n).device) for n, t in zip(names, saved)],
                       "counters": (length, state["stream_tokens"], state["evicted_tokens"], state["position_offset"])})
        session.frames_ingested = state["frames_ingested"]
        last = state["last_stamp_s"]
        session.last_stamp_s = -math.inf if last is None else last
        session.camera_stamps = dict(state["camera_stamps"])
        session._last_stored_s = dict(state["last_stored_s"])
        session._frame_info = {int(f): tuple(v) for f, v in state["frame_info"].items()}
        session._thumbs = {}  # thumbnails are not saved; the old stream's would show under reused frame ids
        session.scene.reset()
        for i, camera in enumerate(state["scene_cameras"]):
            session.scene._background[camera] = tensors[f"scene.{i}"]
    return meta.get("extra", {})
