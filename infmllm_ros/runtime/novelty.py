"""The novelty gate: which camera frames show something new and earn their vision tokens."""

from __future__ import annotations

import torch


class SceneNovelty:
    """Which frames show something new: background subtraction on per-frame summaries.

    Per camera, the background is an exponential moving average of the frames' summary vectors
    (:attr:`~infmllm_ros.models.family.FrameEncoding.summary`); a frame's novelty in [0, 1] is

    * ``"total_variation"`` (class probabilities): ``0.5 * ||p - background||_1``;
    * ``"cosine"`` (feature vectors): ``(1 - cos(p, background)) / 2``.

    The first frame of a camera initialises its background (novelty 0). Each family states its
    metric and default threshold (:class:`~infmllm_ros.models.family.VisionLanguageModel`).

    Args:
        threshold: novelty at or above which a frame counts as novel (0: every frame is novel).
        decay: weight of the old background when a frame is observed, in [0, 1).
        metric: ``"total_variation"`` or ``"cosine"``.

    Raises:
        ValueError: ``threshold`` outside [0, 1], ``decay`` outside [0, 1) or an unknown metric.
    """

    METRICS = ("total_variation", "cosine")

    def __init__(self, threshold: float = 0.6, decay: float = 0.7, metric: str = "total_variation"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"novelty threshold must be in [0, 1], got {threshold}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"background decay must be in [0, 1), got {decay}")
        if metric not in self.METRICS:
            raise ValueError(f"novelty metric must be one of {self.METRICS}, got {metric!r}")
        self.threshold, self.decay, self.metric = threshold, decay, metric
        self._background: dict[str, torch.Tensor] = {}

    def novelty(self, camera: str, probs: torch.Tensor) -> float:
        """Novelty in [0, 1] of a frame summary ``probs`` ``[C]`` (fp32) seen by ``camera``,
        against its background; 0 for its first frame. Does not change state."""
        bg = self._background.get(camera)
        if bg is None:
            return 0.0
        if self.metric == "cosine":
            return float(1.0 - torch.nn.functional.cosine_similarity(probs, bg, dim=0)) / 2
        return 0.5 * float((probs - bg).abs().sum())

    def is_novel(self, novelty: float) -> bool:
        """Whether a frame of this novelty shows something new."""
        return novelty >= self.threshold

    def observe(self, camera: str, probs: torch.Tensor) -> None:
        """Fold a frame's summary ``[C]`` into ``camera``'s background."""
        bg = self._background.get(camera)
        self._background[camera] = probs.clone() if bg is None else self.decay * bg + (1 - self.decay) * probs

    def reset(self) -> None:
        """Forget every camera's background."""
        self._background.clear()
