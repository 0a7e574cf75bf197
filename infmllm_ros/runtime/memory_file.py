"""A stream's memory on disk: the KV buffer and everything a session needs to go on after a restart.

One ``safetensors`` file: the occupied slots of every cache tensor (K, V, positions, kinds, frame
ids, stamps, carried scores, M-RoPE lags) and each camera's novelty background as tensors; the
rest as JSON in the file's metadata under ``"infmllm"``: the format version, the identity of the
stream (model, family, KV dtype, shape, capacity, slack, max chunk, policy, a hash of the system
prompt's token ids) and its state (counters, clocks, per-frame camera, label and pose, ``extra``
from the caller, e.g. the node's stamp origin).

A file is written atomically (:func:`.file_safety.replace_atomically`), so a crash (even
``kill -9``) during a save leaves the previous file whole. A file whose identity differs from the
session's is refused with the fields that differ; a file cut short or not ours is refused by what
``safetensors`` reports (:class:`MemoryFileRefused`, whose ``reason`` names the file's
set-aside name, :func:`.file_safety.set_aside`). A save never replaces a file it could not read
as a memory file of the same stream: that file may be the only copy of another memory.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from .file_safety import replace_atomically
from .pose import Pose

#: Bumped when the layout changes; a file of another version is refused.
FORMAT_VERSION = 1
CACHE_TENSORS = ("k", "v", "position", "kind", "frame", "stamp", "scores", "rope_lag")


def identity(session) -> dict:
    """What must match for a memory file to be loaded into ``session`` (JSON-ready)."""
    cache = session.cache
    layers, kv_heads, _, head_dim = cache.k.shape
    return {
        "format": FORMAT_VERSION,
        "model": session.model.name,
        "family": session.model.family,
        "kv_dtype": str(cache.k.dtype).removeprefix("torch."),
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "capacity": cache.capacity,
        "slack": cache.slack,
        "max_chunk": cache.max_chunk,
        "policy": cache.policy.name,
        "system_prompt": hashlib.sha256(json.dumps(session._system_ids).encode()).hexdigest()[:16],
    }


class MemoryFileRefused(ValueError):
    """A memory file that cannot be loaded into this stream; the file is unchanged.

    Attributes:
        path: the file. reason: a slug for its set-aside name: ``unreadable`` (cut short, or
            not written by :func:`save_memory`), ``other-stream`` (another model, cache layout,
            policy, system prompt or format version) or ``bad-tensors`` (tensors that do not
            fit its own header).
    """

    def __init__(self, path: Path, reason: str, message: str):
        super().__init__(message)
        self.path, self.reason = path, reason


def _read_meta(path: Path, tensors: bool) -> tuple[dict, dict]:
    """The ``"infmllm"`` metadata of ``path`` and, if ``tensors``, its tensors by name.

    Raises:
        MemoryFileRefused: ``unreadable``.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["infmllm"])
            out = {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
        if not isinstance(meta, dict):
            raise TypeError("metadata is not a JSON object")
    except Exception as exc:  # noqa: BLE001 - safetensors and json raise several types for a bad file
        raise MemoryFileRefused(
            path,
            "unreadable",
            f"cannot read memory file {path}: {type(exc).__name__}: {exc} (cut short, or not written by save_memory)",
        ) from None
    return meta, out


def _check_identity(session, path: Path, meta: dict) -> None:
    """Raises MemoryFileRefused (``other-stream``) naming each field where ``meta`` differs from
    ``session``'s identity as ``name: file != this``."""
    want = identity(session)
    have = meta.get("identity", {})
    differ = [f"{k}: {have.get(k)!r} != {v!r}" for k, v in want.items() if have.get(k) != v]
    if differ:
        raise MemoryFileRefused(
            path, "other-stream", f"memory file {path} is from another stream ({'; '.join(differ)})"
        )


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def save_memory(session, path: str | Path, extra: dict | None = None) -> int:
    """Write ``session``'s memory to ``path`` atomically; returns the file's size in bytes.

    Call with the session idle or from the thread that runs it (the node's worker): the state is
    read under the session's lock. An existing ``path`` is replaced only if it reads as a memory
    file of this same stream; no folder is created.

    Raises:
        FileExistsError: ``path`` exists and is not a memory file of this stream (it is untouched;
            the message says what it is).
        OSError: the folder is missing or cannot be written (the old file, if any, is untouched).
    """
    path = Path(path)
    if path.exists():
        if not path.is_file():
            raise FileExistsError(f"{path} is not a file; not overwritten")
        try:
            _check_identity(session, path, _read_meta(path, tensors=False)[0])
        except MemoryFileRefused as exc:
            raise FileExistsError(f"{exc}; not overwritten") from None
    cache = session.cache
    with session._lock:
        snap = cache.snapshot()
        names = [n for n in CACHE_TENSORS if getattr(cache, n) is not None]
        tensors = {f"cache.{n}": t.contiguous().cpu() for n, t in zip(names, snap["tensors"])}
        for i, bg in enumerate(session.scene._background.values()):
            tensors[f"scene.{i}"] = bg.contiguous().cpu()
        length, stream_tokens, evicted, offset = snap["counters"]
        state = {
            "length": length,
            "stream_tokens": stream_tokens,
            "evicted_tokens": evicted,
            "position_offset": offset,
            "frames_ingested": session.frames_ingested,
            "last_stamp_s": _finite(session.last_stamp_s),
            "camera_stamps": session.camera_stamps,
            "last_stored_s": session._last_stored_s,
            "scene_cameras": list(session.scene._background),
            "frame_info": {
                str(f): [camera, label, pose.to_list() if pose else None]
                for f, (camera, label, pose) in session._frame_info.items()
            },
        }
    meta = {"identity": identity(session), "state": state, "extra": extra or {}}
    blob = save(tensors, metadata={"infmllm": json.dumps(meta)})
    replace_atomically(path, lambda tmp: tmp.write_bytes(blob))
    return len(blob)


def load_memory(session, path: str | Path) -> dict:
    """Replace ``session``'s memory with the one in ``path``; returns the file's ``extra``.

    Raises:
        FileNotFoundError: no such file.
        MemoryFileRefused: a file that is cut short, not a memory file, of another format version,
            or from another stream (the message lists each differing field as
            ``name: file != this``). The session and the file are unchanged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no memory file at {path}")
    meta, tensors = _read_meta(path, tensors=True)
    _check_identity(session, path, meta)
    cache = session.cache
    names = [n for n in CACHE_TENSORS if getattr(cache, n) is not None]
    try:
        state = meta["state"]
        length = state["length"]
        saved = [tensors[f"cache.{n}"] for n in names]
        fits = all(t.shape[:2] == getattr(cache, n).shape[:2] and t.shape[2] == length for n, t in zip(names, saved))
        # [camera, label, pose or None]; a file written before poses has [camera, label]
        frame_info = {
            int(f): (v[0], v[1], Pose.from_list(v[2] if len(v) > 2 else None)) for f, v in state["frame_info"].items()
        }
    except (KeyError, TypeError, IndexError, ValueError):
        fits = False
    if not fits:
        raise MemoryFileRefused(path, "bad-tensors", f"memory file {path} has tensors that do not fit its own header")
    with session._lock:
        cache.restore(
            {
                "tensors": [t.to(getattr(cache, n).device) for n, t in zip(names, saved)],
                "counters": (length, state["stream_tokens"], state["evicted_tokens"], state["position_offset"]),
            }
        )
        session.frames_ingested = state["frames_ingested"]
        last = state["last_stamp_s"]
        session.last_stamp_s = -math.inf if last is None else last
        session.camera_stamps = dict(state["camera_stamps"])
        session._last_stored_s = dict(state["last_stored_s"])
        session._frame_info = frame_info
        session._thumbs = {}  # thumbnails are not saved; the old stream's would show under reused frame ids
        session.scene.reset()
        for i, camera in enumerate(state["scene_cameras"]):
            session.scene._background[camera] = tensors[f"scene.{i}"]
    return meta.get("extra", {})
