"""The mutation report's survivor kinds: a changed message, a dropped device, a CUDA call, and a
change of behaviour each land in their own kind."""

import pytest

from infmllm_ros.bench.mutation import survivor_kind

ARANGE = "slots = torch.arange(t, device=logits.device)"
ZEROS = "return torch.zeros(n, dtype=torch.int64, device=device)"
STORE = "self.k[:, :, s:t] = k.to(self.k.device, self.k.dtype)"
QF = "qf = q.to(torch.float32).reshape(hkv, g, w, d)"
SORT = "top = torch.sort(masked, dim=-1, descending=True, stable=True)"
FILL = 'masked = scores.masked_fill(~eligible, float("-inf"))'
SELECT = "return {}(scores, length, sinks, recent, budget)"

#: kind -> (source line, mutated line) pairs that must land in it
CASES = {
    "message": [
        ('raise ValueError(f"beta must be >= 0, got {beta}")', 'raise ValueError(f"XXbeta must be >= 0, got {beta}XX")')
    ],
    "device": [
        (ARANGE, ARANGE.replace("logits.device", "None")),
        (ARANGE, "slots = torch.arange(t, )"),
        ("dev = self.k.device", "dev = None"),
        (STORE, STORE.replace("self.k.device, ", "")),
        ("col = visible_counts(t, q_start, w, logits.device)", "col = visible_counts(t, q_start, w, )"),
    ],
    "dtype": [
        (ZEROS, ZEROS.replace("torch.int64", "None")),
        (ZEROS, ZEROS.replace("dtype=torch.int64, ", "")),
        (STORE, STORE.replace("self.k.dtype", "None")),
        (QF, QF.replace("torch.float32", "None")),
        ("return emb.cos().to(dtype), emb.sin().to(dtype)", "return emb.cos().to(None), emb.sin().to(dtype)"),
    ],
    "sort": [(SORT, SORT.replace("stable=True", "stable=False")), (SORT, SORT.replace("dim=-1, ", ""))],
    "spelling": [(FILL, FILL.replace("-inf", "-INF"))],
    "cuda": [
        (SELECT.format("kernels.saddle_select"), SELECT.format("kernels.saddle_select").replace("budget)", "None)")),
        ("spec.beta, out=self._window)", "None, out=self._window)"),
    ],
    "other": [
        ("if sinks < 0 or recent < 0:", "if sinks < 0 and recent < 0:"),
        ("k = budget - sinks - recent", "k = budget + sinks - recent"),
        (SELECT.format("select_here"), SELECT.format("select_here").replace("budget)", "None)")),
        (QF, QF.replace("d)", "None)")),
        (SORT, SORT.replace("descending=True", "descending=False")),
        (FILL, FILL.replace("-inf", "inf")),
    ],
}


@pytest.mark.parametrize("removed, added, kind", [(r, a, k) for k, pairs in CASES.items() for r, a in pairs])
def test_each_survivor_lands_in_its_kind(removed, added, kind):
    before = "kernels.window_scores(q, k, t, s," if kind == "cuda" and "kernels" not in removed else "x = 1"
    assert survivor_kind(removed, added, before) == kind


def test_every_named_breakage_still_matches_the_source_once(tmp_path):
    """A code change that moves a breakage's source text shows here, not only in `make mutation-ci`."""
    from infmllm_ros.bench.breakages import BREAKAGES, ROOT, apply

    for b in BREAKAGES:
        target = tmp_path / b.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((ROOT / b.path).read_text())
        apply(b, tmp_path)
        assert b.new in target.read_text() and all((ROOT / t).is_file() for t in b.tests), b.name
    target = tmp_path / BREAKAGES[0].path
    target.write_text("nothing to break here\n")
    with pytest.raises(ValueError, match="occurs 0 times"):
        apply(BREAKAGES[0], tmp_path)
