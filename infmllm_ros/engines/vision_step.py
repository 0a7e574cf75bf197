"""Vision encoder + label-embedding projector as one graph: pixels in, LM input tokens out.

The exportable counterpart of ``VisionEncoder.forward`` followed by ``LabelEmbeddingProjector``
(global tokens only, the node's default ``cells=0``), batched: ``[B, 3, 224, 224]`` normalised
pixels (``VisionEncoder.preprocess``) -> ``[B, name_tokens, hidden]`` embeddings, the
projector's table folded in as a constant.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.vision import LabelEmbeddingProjector, VisionEncoder


class VisionTokens(nn.Module):
    """Frames to the LM embeddings that stand for them.

    Args:
        vision: the classifier (``cells`` must be 0).
        projector: maps class probabilities to embeddings (its ``top_k`` is kept).

    Raises:
        ValueError: a vision encoder with cell tokens (not exported).
    """

    def __init__(self, vision: VisionEncoder, projector: LabelEmbeddingProjector):
        super().__init__()
        if vision.cells:
            raise ValueError("VisionTokens exports global tokens only (VisionEncoder(cells=0))")
        self.net = vision.net
        self.register_buffer("name_embeds", projector.name_embeds.detach().clone())
        self.top_k = projector.top_k

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.net.extract_features(pixels)                            # [B, 1280, 7, 7]
        probs = torch.softmax(self.net._fc(feats.mean(dim=(2, 3))), -1)      # [B, 1000]
        top = probs.topk(self.top_k, dim=-1)
        w = top.values / top.values.sum(-1, keepdim=True)                    # [B, k]
        return torch.einsum("bk,bkjh->bjh", w, self.name_embeds[top.indices])
