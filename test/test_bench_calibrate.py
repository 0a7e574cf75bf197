"""infmllm-bench-calibrate: the seen threshold is fitted on some seeds and reported on others."""

import json

from infmllm_ros.bench.calibrate import balanced_accuracy, fit_scale, fit_threshold, main


def needle_file(path, seed, present, absent, policy="inf_mllm"):
    run = {
        "policy": policy,
        "manifest": {"seed": seed},
        "answers": [{"seen_score": s} for s in present],
        "absent_seen_scores": absent,
    }
    path.write_text(json.dumps({"runs": {f"{policy}@1024,5min": run}}))
    return path


def test_threshold_separates_present_from_absent_and_is_reported_on_held_out_seeds(tmp_path):
    files = [
        needle_file(tmp_path / f"s{seed}.json", seed, [0.3 + 0.05 * seed, 0.5, 0.12], [0.1, 0.11, None])
        for seed in range(6)
    ]
    out = tmp_path / "cal.json"
    assert main([*map(str, files), "--json", str(out)]) == 0
    cal = json.loads(out.read_text())
    assert abs(cal["threshold"] - 0.115) < 1e-9  # between the highest absent and the lowest present score
    assert cal["report"]["absent_rejected"] == 1.0 and cal["report"]["present"] == 9
    assert cal["fit_seeds"] == [0, 1, 2] and cal["report_seeds"] == [3, 4, 5]
    assert "report seeds 3,4,5" in out.with_suffix(".md").read_text()


def test_fit_helpers():
    assert balanced_accuracy([0.5, 0.6], [0.1, 0.2], 0.3) == 1.0
    t = fit_threshold([0.5, 0.6], [0.1, 0.2])
    assert 0.2 < t < 0.5 and abs(t - 0.35) < 1e-9  # the middle of the perfect range
    assert fit_scale([0.5, 0.6], [0.1, 0.2], t) < fit_scale([0.5, 0.15], [0.1, 0.45], t)  # overlap: wider


def test_seeds_fitted_and_reported_on_must_differ(tmp_path, capsys):
    f = needle_file(tmp_path / "s.json", 0, [0.5], [0.1])
    assert main([str(f), "--fit-seeds", "0", "--report-seeds", "0", "--json", str(tmp_path / "c.json")]) == 2
    assert "both fitted on and reported on" in capsys.readouterr().err
    assert main([str(f), "--json", str(tmp_path / "c.json")]) == 2  # seeds 1..5 missing
