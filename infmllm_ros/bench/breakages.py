"""``python -m infmllm_ros.bench.breakages`` (``make mutation-ci``): named breakages of the KV cache,
each applied to a copy of the checkout, each of which the tests must catch.

The targeted subset of mutation testing that CI runs (minutes; the full mutmut run over
``kvcache/`` takes hours on 2 cores: ``make mutation``). Each breakage is one source substitution
that a reviewer would try against a cache like this one: keys not re-rotated on compaction,
scores not carried or not decayed, a question that should leave the stream untouched kept, a
failed chunk not rolled back, the worst saddles kept, the vision budget given to text, the bias
turned around, lazy eviction ignoring its slack, the M-RoPE lag reset instead of accumulated, a
restore that forgets a counter. A breakage passes when at least one of its tests fails on the
broken copy; one whose substitution no longer matches the source fails loudly (update it with
the code).

Exit status 0 when every breakage is caught, 1 otherwise (the uncaught ones are listed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Breakage:
    """One substitution in one file, and the test files expected to catch it.

    Attributes:
        name: what breaks, in words.
        path: file relative to the repository root.
        old, new: the exact source text and its replacement (``old`` must occur exactly once).
        tests: pytest paths (relative to the root) run on the broken copy, stopping at the first failure.
    """

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


CACHE, POLICIES, REFERENCE = (
    "infmllm_ros/kvcache/cache.py",
    "infmllm_ros/kvcache/policies.py",
    "infmllm_ros/kvcache/reference.py",
)
FAST = ("test/test_cache.py", "test/test_reference.py")

BREAKAGES = (
    Breakage(
        "compaction keeps keys at their old rotation",
        REFERENCE,
        "        kept_k = rope.rerotate(kept_k, shift)\n",
        "        pass\n",
        FAST,
    ),
    Breakage(
        "scores are not carried from chunk to chunk",
        POLICIES,
        "return self.decay * scores + window",
        "return window",
        FAST,
    ),
    Breakage(
        "carried scores are not decayed",
        POLICIES,
        "return self.decay * scores + window",
        "return scores + window",
        FAST,
    ),
    Breakage(
        "the attention bias favours old slots",
        POLICIES,
        "bias = self.beta * torch.arange",
        "bias = -self.beta * torch.arange",
        FAST,
    ),
    Breakage(
        "selection keeps the lowest-scoring saddles",
        REFERENCE,
        "torch.sort(candidates, dim=-1, descending=True, stable=True)",
        "torch.sort(candidates, dim=-1, descending=False, stable=True)",
        FAST,
    ),
    Breakage(
        "the vision budget reserves text slots",
        POLICIES,
        "eligible = kind == SlotKind.VISION",
        "eligible = kind == SlotKind.TEXT",
        FAST,
    ),
    Breakage(
        "lazy eviction ignores its slack", CACHE, "if t <= self.capacity + self.slack:", "if t <= self.capacity:", FAST
    ),
    Breakage(
        "restore forgets the position offset",
        CACHE,
        'self.length, self.stream_tokens, self.evicted_tokens, self.position_offset = snap["counters"]',
        'self.length, self.stream_tokens, self.evicted_tokens, _ = snap["counters"]',
        FAST,
    ),
    Breakage(
        "the M-RoPE lag is reset instead of accumulated",
        CACHE,
        "self.position_offset += self._advance - self.pending",
        "self.position_offset = self._advance - self.pending",
        FAST,
    ),
    Breakage(
        "a chunk that fails half-way through the layers is not rolled back",
        "infmllm_ros/models/decoder.py",
        "            cache.rollback()\n            raise\n",
        "            raise\n",
        ("test/test_cache.py",),
    ),
    Breakage(
        "a question asked without keep_in_context is not undone",
        "infmllm_ros/runtime/session.py",
        "                    self.cache.restore(snap)\n",
        "                    pass\n",
        ("test/test_session.py",),
    ),
)


def tracked_files(root: Path) -> list[str]:
    """Files git tracks under ``root`` (the copy holds exactly these)."""
    return subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()


def copy_checkout(root: Path, dest: Path) -> None:
    """Copy the tracked files of ``root`` (results excepted) into ``dest``."""
    for rel in tracked_files(root):
        if rel.startswith("bench/results/"):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def apply(breakage: Breakage, copy: Path) -> None:
    """Write ``breakage`` into ``copy``.

    Raises:
        ValueError: ``old`` does not occur exactly once in the file (the source changed).
    """
    path = copy / breakage.path
    text = path.read_text()
    if text.count(breakage.old) != 1:
        raise ValueError(
            f"breakage {breakage.name!r}: its source text occurs {text.count(breakage.old)} times "
            f"in {breakage.path}, not once; update it with the code"
        )
    path.write_text(text.replace(breakage.old, breakage.new))


def caught(breakage: Breakage, root: Path, python: str) -> tuple[bool, float]:
    """Run ``breakage``'s tests on a broken copy of ``root``; (a test failed, seconds taken).

    Raises:
        RuntimeError: the copy's package is not the one imported, or pytest could not run the
            tests (exit status other than 0 or 1; its output is included).
    """
    with tempfile.TemporaryDirectory(prefix="breakage-") as tmp:
        copy = Path(tmp) / "checkout"
        copy_checkout(root, copy)
        if (root.parent / "shared").is_dir():  # the tests' ../shared data, as beside the checkout
            (Path(tmp) / "shared").symlink_to(root.parent / "shared")
        apply(breakage, copy)
        # the copy's package first on the path, ahead of the editable install of the checkout
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        where = subprocess.run(
            [python, "-c", "import infmllm_ros; print(infmllm_ros.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not where.startswith(str(copy)):
            raise RuntimeError(f"the broken copy is not what the tests import ({where})")
        start = time.monotonic()
        run = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *breakage.tests],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
        )
        if run.returncode not in (0, 1):
            raise RuntimeError(f"pytest could not run {breakage.tests} (exit {run.returncode}):\n{run.stdout[-3000:]}")
        return run.returncode == 1, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infmllm_ros.bench.breakages", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run the breakages whose name contains this text")
    args = p.parse_args(argv)
    chosen = [b for b in BREAKAGES if args.only in b.name]
    missed = []
    for i, b in enumerate(chosen, 1):
        hit, seconds = caught(b, ROOT, sys.executable)
        print(
            f"[{i}/{len(chosen)}] {'caught' if hit else 'NOT CAUGHT'} in {seconds:.0f} s: {b.name} "
            f"({b.path}; {' '.join(b.tests)})",
            flush=True,
        )
        if not hit:
            missed.append(b.name)
    if missed:
        print(f"{len(missed)} breakage(s) no test caught: {missed}", file=sys.stderr)
        return 1
    print(f"all {len(chosen)} breakages caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
