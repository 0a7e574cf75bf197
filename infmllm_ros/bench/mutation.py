"""``python -m infmllm_ros.bench.mutation``: the mutation-testing report of the KV-cache package.

Run after ``make mutation`` (mutmut, configured in ``setup.cfg``), in the repository. Reads
mutmut's verdict for every mutant (``mutmut results --all true``) and the diff of every survivor
(``mutmut show``), and sorts the survivors into kinds:

* ``cuda``: the mutated line calls one of our CUDA kernels (``kernels.*``) or the condition that
  sends work to them. Unreachable without a GPU; the CUDA parity tests kill these on a GPU machine.
* ``device``: only a ``device=`` argument changed or went away; on this CPU-only machine a tensor
  lands on the CPU either way (no observable change here).
* ``message``: only string text changed (an error message; tests match its key words).
* ``other``: everything else: a gap in the tests, or a mutant with no observable effect, explained by hand.

Kill rate = (killed + timed out) / (killed + timed out + survived + no tests): over the mutants
checked (a stopped run leaves some "not checked"), and over those reachable and observable here (without ``cuda``, ``device`` and ``message``). Writes JSON and markdown.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .common import machine, markdown_table, write_report

_STRING = re.compile(r"""[rbfu]*("([^"\\]|\\.)*"|'([^'\\]|\\.)*')""", re.IGNORECASE)
_DEVICE = re.compile(r",?\s*device=[^,)]*")


def survivor_kind(removed: str, added: str, before: str = "") -> str:
    """The kind of a surviving mutant from its diff's removed and added line and the source line
    just before them (a call continued onto the mutated line starts there; see the module
    docstring): ``cuda``, ``device``, ``message`` or ``other``."""
    if "kernels." in removed or "_cuda_kernels" in removed or ("kernels." in before and before.endswith((",", "("))):
        return "cuda"
    if _DEVICE.sub("", removed).replace(", )", ")") == _DEVICE.sub("", added).replace(", )", ")") \
            and removed != added:
        return "device"
    if _STRING.sub('""', removed) == _STRING.sub('""', added):
        return "message"
    return "other"


def _mutmut(*args: str) -> str:
    return subprocess.run([str(Path(sys.executable).with_name("mutmut")), *args], capture_output=True, text=True,
                          check=True).stdout


def diff_lines(name: str) -> tuple[str, str, str]:
    """The (removed, added, line before) source lines of mutant ``name`` (stripped; "" when
    empty)."""
    lines = _mutmut("show", name).splitlines()
    removed = [x[1:].strip() for x in lines if x.startswith("-") and not x.startswith("---")]
    added = [x[1:].strip() for x in lines if x.startswith("+") and not x.startswith("+++")]
    first = next((i for i, x in enumerate(lines) if x.startswith("-") and not x.startswith("---")), 0)
    before = lines[first - 1].strip() if first and lines[first - 1].startswith(" ") else ""
    return " ".join(removed), " ".join(added), before


def _cell(code: str) -> str:
    return "`" + code.replace("|", "\\|") + "`"


def main(argv=None) -> int:
    """Console entry point: writes ``--json`` and the markdown beside it; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/mutation_kvcache.json", help="output JSON")
    args = p.parse_args(argv)
    verdicts = {}
    for line in _mutmut("results", "--all", "true").splitlines():
        name, _, verdict = line.strip().rpartition(": ")
        if name:
            verdicts[name] = verdict
    survivors = []
    for name in sorted(n for n, v in verdicts.items() if v == "survived"):
        removed, added, before = diff_lines(name)
        survivors.append({"mutant": name, "kind": survivor_kind(removed, added, before), "removed": removed,
                          "added": added})
    counts = Counter(verdicts.values())
    kinds = Counter(s["kind"] for s in survivors)
    scored = counts["killed"] + counts["timeout"] + counts["survived"] + counts["no tests"]
    excused = kinds["cuda"] + kinds["device"] + kinds["message"]
    data = {"machine": machine(), "command": "make mutation && python -m infmllm_ros.bench.mutation",
            "verdicts": dict(counts), "survivor_kinds": dict(kinds),
            "kill_rate": (counts["killed"] + counts["timeout"]) / scored if scored else None,
            "kill_rate_reachable": (counts["killed"] + counts["timeout"]) / (scored - excused) if scored > excused else None,
            "survivors": survivors,
            "no_tests": sorted(n for n, v in verdicts.items() if v == "no tests")}
    per_file = Counter((s["mutant"].split(".")[2], s["kind"]) for s in survivors)
    files = sorted({f for f, _ in per_file})
    md = ["# Mutation testing of infmllm_ros/kvcache", "",
          f"{sum(counts.values())} mutants: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
          f"Kill rate {data['kill_rate']:.3f} over the {scored} mutants checked; {data['kill_rate_reachable']:.3f} "
          "without the "
          "survivors that are CUDA-only, device-only or message-only (see the module docstring of "
          "infmllm_ros/bench/mutation.py).", "",
          markdown_table(["file", "cuda", "device", "message", "other"],
                         [[f] + [per_file[(f, k)] for k in ("cuda", "device", "message", "other")] for f in files]),
          "", "## Other survivors", "",
          markdown_table(["mutant", "line", "mutated to"],
                         [[s["mutant"].split(".", 2)[2], _cell(s["removed"]), _cell(s["added"])]
                          for s in survivors if s["kind"] == "other"])]
    write_report(args.json, data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
