"""Files that must never be lost: a refused file is set aside byte for byte and never renamed
twice, the temporary files of killed writes are removed, a path from the ROS graph must resolve
inside its folder, and an atomic replace leaves no trace when the writer fails."""

import os

import pytest

from infmllm_ros.runtime.file_safety import remove_stale_temps, replace_atomically, resolve_inside, set_aside


def test_a_refused_file_is_set_aside_intact_and_never_renamed_twice(tmp_path):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(b"cut sh")
    first = set_aside(path, "Cut short!", now=0.0)
    assert first.name == "memory.safetensors.refused-cut-short-19700101T000000Z"
    assert first.read_bytes() == b"cut sh" and not path.exists()
    path.write_bytes(b"second")  # a second refusal in the same second gets its own name
    second = set_aside(path, "cut-short", now=0.0)
    assert second.name.endswith("-2") and second.read_bytes() == b"second" and first.read_bytes() == b"cut sh"
    assert set_aside(first, "other-stream") is None and first.exists()  # already set aside: stays put
    assert set_aside(tmp_path / "absent", "x") is None


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    stale = tmp_path / ".memory.safetensors.ab3_x9z1.tmp"
    stale.write_bytes(b"half a save")
    keep = [
        tmp_path / "memory.safetensors",
        tmp_path / "notes.tmp",
        tmp_path / ".hidden.tmp",
        tmp_path / "memory.safetensors.refused-cut-short-20261206T120000Z",
    ]
    for p in keep:
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and all(p.exists() for p in keep)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"old")

    def fail(tmp):
        tmp.write_bytes(b"new, half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.bin"]
    replace_atomically(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["m.bin"]
    with pytest.raises(FileNotFoundError):  # no folder is created
        replace_atomically(tmp_path / "sub" / "m.bin", lambda tmp: tmp.write_bytes(b"x"))


def test_paths_must_resolve_inside_the_folder(tmp_path):
    root = tmp_path / "memory"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file_link").symlink_to(outside / "victim.txt")
    assert resolve_inside(root, "m.safetensors") == (root / "m.safetensors").resolve()
    assert resolve_inside(root, "sub/m.safetensors") == (root / "sub" / "m.safetensors").resolve()
    assert resolve_inside(root, root / "m.safetensors") == (root / "m.safetensors").resolve()
    for bad in ("../x", str(outside / "x"), "link/x", "file_link", ".", "sub/.."):
        with pytest.raises(ValueError, match="outside the memory folder"):
            resolve_inside(root, bad)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_inside(root, "new/m.safetensors")
