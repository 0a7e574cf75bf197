"""The mutation report's survivor kinds: a changed message, a dropped device, a CUDA call, and a
change of behaviour each land in their own kind."""
import pytest

from infmllm_ros.bench.mutation import survivor_kind


@pytest.mark.parametrize("removed, added, kind", [
    ('raise ValueError(f"beta must be >= 0, got {beta}")', 'raise ValueError(f"XXbeta must be >= 0, got {beta}XX")',
     "message"),
    ("slots = torch.arange(t, device=logits.device)", "slots = torch.arange(t, device=None)", "device"),
    ("slots = torch.arange(t, device=logits.device)", "slots = torch.arange(t, )", "device"),
    ("return kernels.saddle_select(scores, length, sinks, recent, budget)",
     "return kernels.saddle_select(scores, length, sinks, recent, None)", "cuda"),
    ("if sinks < 0 or recent < 0:", "if sinks < 0 and recent < 0:", "other"),
    ("spec.beta, out=self._window)", "None, out=self._window)", "cuda"),
    ("k = budget - sinks - recent", "k = budget + sinks - recent", "other"),
    ("dev = self.k.device", "dev = None", "device"),
    ("col = col / visible_counts(t, q_start, w, logits.device).clamp(min=1.0)",
     "col = col / visible_counts(t, q_start, w, ).clamp(min=1.0)", "device"),
    ("self.k[:, :, s:t] = k.to(self.k.device, self.k.dtype)", "self.k[:, :, s:t] = k.to(self.k.dtype)", "device"),
    ("self.k[:, :, s:t] = k.to(self.k.device, self.k.dtype)", "self.k[:, :, s:t] = k.to(self.k.device, None)", "dtype"),
    ("return kernels_free(scores, length, sinks, recent, budget)", "return kernels_free(scores, length, sinks, recent, None)",
     "other"),
    ("return torch.zeros(n, dtype=torch.int64, device=device)", "return torch.zeros(n, dtype=None, device=device)",
     "dtype"),
    ("return torch.zeros(n, dtype=torch.int64, device=device)", "return torch.zeros(n, device=device)", "dtype"),
    ("qf = q.to(torch.float32).reshape(hkv, g, w, d)", "qf = q.to(None).reshape(hkv, g, w, d)", "dtype"),
    ("return emb.cos().to(dtype), emb.sin().to(dtype)", "return emb.cos().to(None), emb.sin().to(dtype)", "dtype"),
    ("qf = q.to(torch.float32).reshape(hkv, g, w, d)", "qf = q.to(torch.float32).reshape(hkv, g, w, None)", "other"),
    ("top = torch.sort(masked, dim=-1, descending=True, stable=True)",
     "top = torch.sort(masked, dim=-1, descending=True, stable=False)", "sort"),
    ("top = torch.sort(masked, dim=-1, descending=True, stable=True)",
     "top = torch.sort(masked, descending=True, stable=True)", "sort"),
    ("top = torch.sort(masked, dim=-1, descending=True, stable=True)",
     "top = torch.sort(masked, dim=-1, descending=False, stable=True)", "other"),
    ('masked = scores.masked_fill(~eligible, float("-inf"))', 'masked = scores.masked_fill(~eligible, float("-INF"))',
     "spelling"),
    ('masked = scores.masked_fill(~eligible, float("-inf"))', 'masked = scores.masked_fill(~eligible, float("inf"))',
     "other"),
])
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
