"""``python -m infmllm_ros.bench.mutation``: the mutation-testing report of the KV-cache package.

Run after ``make mutation`` (mutmut, configured in ``setup.cfg``), in the repository. Reads
mutmut's verdict for every mutant (``mutmut results --all true``) and the diff of every survivor
(``mutmut show``), and sorts the survivors into kinds:

* ``cuda``: the mutated line calls one of our CUDA kernels (``kernels.*``) or the condition that
  sends work to them. Unreachable without a GPU; the CUDA parity tests kill these on a GPU machine.
* ``device``: only a device argument (``device=``, or a positional ``x.device``) changed to None
  or went away; on this CPU-only machine a tensor lands on the CPU either way.
* ``dtype``: only a dtype argument or a ``.to(x)`` conversion changed or went away; the
  tests run the cache in fp32, where the value already has that dtype (or is cast back on
  assignment into a typed buffer). A half-precision run on a GPU tells these apart.
* ``sort``: only ``stable=`` or ``dim=-1`` of a sort changed; ``dim=-1`` is the default, and on the
  CPU torch keeps ties in order at these sizes whether asked or not.
* ``spelling``: only the case of a ``float("...")`` literal (``-inf`` and ``-INF`` are one number).
* ``message``: only string text changed (an error message; tests match its key words).
* ``other``: everything else: a gap in the tests, or a mutant explained by hand.

``device``, ``dtype``, ``sort`` and ``spelling`` change nothing observable on this machine;
``cuda`` ones cannot run here. Kill rate = (killed + timed out) / (killed + timed out + survived
+ no tests), over the mutants checked (a stopped run leaves some "not checked"), over those that
change something and run here (without those four kinds and ``cuda``), and over those without
``message`` too. Writes JSON and markdown.
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
_DEVICE = re.compile(r",?\s*device=[^,)]*|\b(?:[\w.]+\.device|dev|device|None)\b(?=\s*(?:[,)]|$))")
_DTYPE = re.compile(r",?\s*dtype=[^,)]*|\.to\([\w.]*\)|\b(?:[\w.]+\.dtype|dtype|None)\b(?=\s*(?:[,)]|$))")
_SORT = re.compile(r",?\s*(stable=[^,)]*|dim=-1)")
_FLOAT = re.compile(r'float\("([^"]*)"\)')

#: Survivor kinds that change nothing observable on this machine (module docstring).
EQUIVALENT_HERE = ("device", "dtype", "sort", "spelling")


def _same_without(pattern: re.Pattern, removed: str, added: str) -> bool:
    """Whether the two lines differ and are equal once ``pattern``'s matches are removed."""

    def strip(line: str) -> str:
        return pattern.sub("", line).replace(", )", ")").replace("(, ", "(")

    return removed != added and strip(removed) == strip(added)


def survivor_kind(removed: str, added: str, before: str = "") -> str:
    """The kind of a surviving mutant from its diff's removed and added line and the source line
    just before them (a call continued onto the mutated line starts there; see the module
    docstring): ``cuda``, one of :data:`EQUIVALENT_HERE`, ``message`` or ``other``."""
    if "kernels." in removed or "_cuda_kernels" in removed or ("kernels." in before and before.endswith((",", "("))):
        return "cuda"
    if _same_without(_DEVICE, removed, added):
        return "device"
    if _same_without(_DTYPE, _DEVICE.sub("", removed), _DEVICE.sub("", added)):
        return "dtype"
    if _same_without(_SORT, removed, added) and "sort(" in removed:
        return "sort"
    floats = [[x.lower() for x in _FLOAT.findall(line)] for line in (removed, added)]
    if floats[0] != floats[1]:
        return "other"  # a number changed, not a message
    if removed != added and _FLOAT.sub(lambda m: m.group(0).lower(), removed) == _FLOAT.sub(
        lambda m: m.group(0).lower(), added
    ):
        return "spelling"
    if _STRING.sub('""', removed) == _STRING.sub('""', added):
        return "message"
    return "other"


def _mutmut(*args: str) -> str:
    return subprocess.run(
        [str(Path(sys.executable).with_name("mutmut")), *args], capture_output=True, text=True, check=True
    ).stdout


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
        survivors.append(
            {"mutant": name, "kind": survivor_kind(removed, added, before), "removed": removed, "added": added}
        )
    counts = Counter(verdicts.values())
    kinds = Counter(s["kind"] for s in survivors)
    scored = counts["killed"] + counts["timeout"] + counts["survived"] + counts["no tests"]
    killed = counts["killed"] + counts["timeout"]
    unobservable = sum(kinds[k] for k in EQUIVALENT_HERE)
    reachable = scored - unobservable - kinds["cuda"]

    def rate(total: int) -> float | None:
        return killed / total if total > 0 else None

    data = {
        "machine": machine(),
        "command": "make mutation && python -m infmllm_ros.bench.mutation",
        "verdicts": dict(counts),
        "survivor_kinds": dict(kinds),
        "kill_rate": rate(scored),
        "kill_rate_non_equivalent": rate(reachable),
        "kill_rate_non_equivalent_behaviour": rate(reachable - kinds["message"]),
        "survivors": survivors,
        "no_tests": sorted(n for n, v in verdicts.items() if v == "no tests"),
    }
    per_file = Counter((s["mutant"].split(".")[2], s["kind"]) for s in survivors)
    files = sorted({f for f, _ in per_file})
    kind_names = ("cuda", *EQUIVALENT_HERE, "message", "other")
    md = [
        "# Mutation testing of infmllm_ros/kvcache",
        "",
        f"{sum(counts.values())} mutants: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        "",
        markdown_table(
            ["kill rate over", "mutants", "rate"],
            [
                ["all checked", scored, f"{data['kill_rate']:.3f}"],
                [
                    "observable and runnable here (without cuda, device, dtype, sort, spelling)",
                    reachable,
                    f"{data['kill_rate_non_equivalent']:.3f}",
                ],
                [
                    "the same without message-only",
                    reachable - kinds["message"],
                    f"{data['kill_rate_non_equivalent_behaviour']:.3f}",
                ],
            ],
        ),
        "",
        "Survivor kinds: the module docstring of infmllm_ros/bench/mutation.py.",
        "",
        markdown_table(["file", *kind_names], [[f] + [per_file[(f, k)] for k in kind_names] for f in files]),
        "",
        "## Every survivor",
        "",
        markdown_table(
            ["kind", "mutant", "line", "mutated to"],
            [
                [s["kind"], s["mutant"].split(".", 2)[2], _cell(s["removed"]), _cell(s["added"])]
                for s in sorted(survivors, key=lambda s: (kind_names.index(s["kind"]), s["mutant"]))
            ],
        ),
    ]
    write_report(args.json, data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
