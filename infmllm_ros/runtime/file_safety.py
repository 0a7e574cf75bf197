"""Files that may hold the only copy of hours of a robot's memory, and the rules that keep them.

* **Atomic replace** (:func:`replace_atomically`): a file is written to a temporary file beside it
  (``.<name>.<8 random characters>.tmp``), flushed and fsynced, renamed over the target and the
  folder fsynced, so a crash (even ``kill -9``) leaves either the old file or the new one whole.
* **Stale temporary files** (:func:`remove_stale_temps`): the temporary file of a write that was
  killed is removed the next time its folder is opened.
* **Set aside, never destroyed** (:func:`set_aside`): a file the program refuses to read (cut
  short, from another model or cache size, not ours) is renamed in place to
  ``<name>.refused-<reason>-<UTC time>`` and kept byte for byte; a file already set aside is never
  renamed again.
* **Confinement** (:func:`resolve_inside`): a path taken from the ROS graph (which has no
  authentication) must resolve, symlinks followed, inside one folder.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: ``.<name>.<mkstemp's 8 characters>.tmp``: the temporary files :func:`replace_atomically` writes.
TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
#: The infix of a file that was set aside (:func:`set_aside`).
REFUSED_INFIX = ".refused-"


def _fsync(path: Path | str) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """Create or replace ``path`` with what ``write(tmp)`` writes to a temporary path beside it.

    The folder must exist (no folder is ever created here). If ``write`` raises, the temporary
    file is removed and ``path`` is untouched.

    Raises:
        OSError: the folder is missing or cannot be written; whatever ``write`` raises.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files of interrupted :func:`replace_atomically` writes in ``folder``
    (names matching :data:`TEMP_PATTERN`); returns the removed paths. Call before any write to the
    folder starts. A missing folder has none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if TEMP_PATTERN.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def set_aside(path: str | Path, reason: str, now: float | None = None) -> Path | None:
    """Rename a refused file to ``<name>.refused-<reason>-<UTC YYYYmmddTHHMMSSZ>[-n]`` in its own
    folder, its bytes untouched; returns the new path, or None if the file was already set aside
    (its name holds :data:`REFUSED_INFIX`) or is gone.

    ``reason`` is a short slug (``cut-short``, ``other-stream``); other characters become ``-``.

    Raises:
        OSError: the folder cannot be written (the file stays where it was).
    """
    path = Path(path)
    if REFUSED_INFIX in path.name or not path.exists():
        return None
    slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-") or "unreadable"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = path.with_name(f"{path.name}{REFUSED_INFIX}{slug}-{stamp}")
    n = 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}{REFUSED_INFIX}{slug}-{stamp}-{n}")
    os.rename(path, target)
    _fsync(target.parent)
    return target


def resolve_inside(folder: str | Path, name: str | Path) -> Path:
    """``name`` (a file name, or a path relative to ``folder``, or an absolute path) resolved with
    symlinks followed; it must lie strictly inside ``folder`` (itself resolved), in a subfolder
    that exists.

    Raises:
        ValueError: the path resolves outside ``folder`` (``..``, an absolute path elsewhere, a
            symlink out of it), is ``folder`` itself, or its parent folder does not exist.
    """
    root = Path(folder).resolve()
    target = (root / Path(name)).resolve()
    if target == root or not target.is_relative_to(root):
        raise ValueError(f"{str(name)!r} resolves to {target}, outside the memory folder {root}")
    if not target.parent.is_dir():
        raise ValueError(f"{str(name)!r}: folder {target.parent} does not exist (no folder is created)")
    return target
