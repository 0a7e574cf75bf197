"""``infmllm-bench-calibrate``: fit the ``seen`` decision on needle drives and report it on others.

Every needle run asks about its six events (present objects) and six objects never shown
(absent), and records each question's best sighting score (:mod:`infmllm_ros.runtime.recall`).
This tool fits the threshold and the logistic width of :func:`~infmllm_ros.runtime.recall.judge`
on the runs of some drive seeds and reports precision and recall of ``seen`` on the runs of the
other seeds, so the figure is never measured on the drives it was fitted on:

    infmllm-bench-calibrate bench/results/needle_seed*.json --fit-seeds 0,1,2 --report-seeds 3,4,5 \\
        --json bench/results/seen_calibration.json

Fit: the threshold maximises balanced accuracy ((recall of present + recall of absent) / 2) over
the midpoints between observed scores (ties: the midpoint of the best range); the width is the
logistic's maximum-likelihood scale at that threshold, over a grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .common import markdown_table, write_json


def samples(paths: list[Path], policy: str) -> dict[int, dict[str, list[float]]]:
    """Best-sighting scores per drive seed: ``{seed: {"present": [...], "absent": [...]}}`` from
    the runs of ``policy`` in the needle JSON files ``paths`` (a question without sightings
    scores 0).

    Raises:
        FileNotFoundError: a missing file. ValueError: a file that is not needle JSON.
    """
    out: dict[int, dict[str, list[float]]] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"needle results not found: {path}")
        try:
            runs = json.loads(path.read_text())["runs"].values()
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: not an infmllm-bench-needle JSON file ({exc})") from exc
        for run in runs:
            if run["policy"] != policy or not run["answers"]:
                continue
            seed = int(run["manifest"]["seed"])
            got = out.setdefault(seed, {"present": [], "absent": []})
            got["present"] += [a["seen_score"] or 0.0 for a in run["answers"]]
            got["absent"] += [s or 0.0 for s in run["absent_seen_scores"]]
    return out


def fit_threshold(present: list[float], absent: list[float]) -> float:
    """The score threshold with the best balanced accuracy (midpoint of the best range).

    Raises:
        ValueError: no present or no absent samples.
    """
    if not present or not absent:
        raise ValueError("need scores of both present and absent objects to fit a threshold")
    values = sorted(set(present + absent))
    cuts = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]
    scored = [(balanced_accuracy(present, absent, c), c) for c in cuts]
    best = max(s for s, _ in scored)
    winners = [c for s, c in scored if s == best]
    return (winners[0] + winners[-1]) / 2


def balanced_accuracy(present: list[float], absent: list[float], threshold: float) -> float:
    """Mean of the fractions of present scores >= ``threshold`` and absent scores below it."""
    return (sum(p >= threshold for p in present) / len(present) + sum(a < threshold for a in absent) / len(absent)) / 2


def fit_scale(present: list[float], absent: list[float], threshold: float) -> float:
    """Maximum-likelihood width of ``sigmoid((score - threshold) / scale)`` (grid 0.005..0.5)."""

    def nll(scale: float) -> float:
        total = 0.0
        for x, y in [(p, 1) for p in present] + [(a, 0) for a in absent]:
            q = 1 / (1 + math.exp(-max(min((x - threshold) / scale, 60), -60)))
            total -= math.log(max(q if y else 1 - q, 1e-12))
        return total

    return min((0.005 * 1.1**i for i in range(48)), key=nll)


def precision_recall(present: list[float], absent: list[float], threshold: float) -> dict:
    """``seen`` at ``threshold``: precision and recall on present objects, and the fraction of
    absent objects judged not seen."""
    tp = sum(p >= threshold for p in present)
    fp = sum(a >= threshold for a in absent)
    return {
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / len(present) if present else None,
        "absent_rejected": 1 - fp / len(absent) if absent else None,
        "present": len(present),
        "absent": len(absent),
    }


def main(argv=None) -> int:
    """Console entry point; returns the exit status (2 on bad input)."""
    p = argparse.ArgumentParser(prog="infmllm-bench-calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("needle_json", nargs="+", type=Path)
    p.add_argument("--policy", default="inf_mllm")
    p.add_argument("--fit-seeds", default="0,1,2")
    p.add_argument("--report-seeds", default="3,4,5")
    p.add_argument("--json", required=True, type=Path)
    args = p.parse_args(argv)
    try:
        fit_seeds = {int(x) for x in args.fit_seeds.split(",") if x}
        report_seeds = {int(x) for x in args.report_seeds.split(",") if x}
        if fit_seeds & report_seeds:
            raise ValueError(f"seeds {sorted(fit_seeds & report_seeds)} are both fitted on and reported on")
        data = samples(args.needle_json, args.policy)
        missing = (fit_seeds | report_seeds) - set(data)
        if missing:
            raise ValueError(f"no {args.policy} runs for seeds {sorted(missing)} in the given files")
        fit = {k: sum((data[s][k] for s in sorted(fit_seeds)), []) for k in ("present", "absent")}
        threshold = fit_threshold(fit["present"], fit["absent"])
    except (FileNotFoundError, ValueError) as exc:
        print(f"infmllm-bench-calibrate: error: {exc}", file=sys.stderr)
        return 2
    scale = fit_scale(fit["present"], fit["absent"], threshold)
    held = {k: sum((data[s][k] for s in sorted(report_seeds)), []) for k in ("present", "absent")}
    result = {
        "policy": args.policy,
        "fit_seeds": sorted(fit_seeds),
        "report_seeds": sorted(report_seeds),
        "threshold": threshold,
        "scale": scale,
        "fit": precision_recall(fit["present"], fit["absent"], threshold),
        "report": precision_recall(held["present"], held["absent"], threshold),
        "scores": data,
        "files": [str(x) for x in args.needle_json],
    }
    write_json(args.json, result)
    rows = [
        [name, r["present"], r["absent"], r["precision"], r["recall"], r["absent_rejected"]]
        for name, r in (
            ("fit seeds " + args.fit_seeds, result["fit"]),
            ("report seeds " + args.report_seeds, result["report"]),
        )
    ]
    args.json.with_suffix(".md").write_text(
        "\n".join(
            [
                "# The `seen` decision: threshold fitted on some drives, reported on others",
                "",
                f"Policy {args.policy}; threshold {threshold:.3f}, logistic width {scale:.3f} "
                f"(fitted on seeds {args.fit_seeds}).",
                "",
                markdown_table(["drives", "present", "absent", "precision", "recall", "absent judged unseen"], rows),
                "",
            ]
        )
    )
    print(json.dumps({k: result[k] for k in ("threshold", "scale", "fit", "report")}))
    return 0
