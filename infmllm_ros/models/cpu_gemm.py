"""Linear layers with weights prepacked for oneDNN, for chunk-sized GEMMs on a CPU.

A frame chunk is ~20 tokens, so every projection is a thin GEMM (``M`` ~ 20, ``K`` = 576,
``N`` up to 1536 for SmolLM2). MKL's ``sgemm`` behind ``nn.Linear`` runs these at a fraction of
the CPU's peak; oneDNN with the weight reordered once into its blocked layout for a given row
count runs the 210 projections of a SmolLM2 chunk in ~60% of the time on the 2-core AVX2 EPYC
of CI (``bench/results/README.md``, "Ingest on this CPU"). The packed weight replaces the dense
one (same memory), and :func:`dense_linears` gives the model back its ``nn.Linear`` layers for
code that needs dense weights (ONNX export).

The two ops are PyTorch's own (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, what Inductor's weight freezing emits on CPU); they are internal, so
:func:`pack_linears` checks them against ``F.linear`` once and leaves the model as it is if
they are missing or disagree.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Largest |packed - dense| output of the self-check, relative to the output's magnitude.
CHECK_RTOL = 1e-4


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (CPU, fp32).

    Args:
        linear: the dense layer (its weight ``[out, in]`` fp32 on CPU); not modified.
        rows_hint: typical rows of ``x`` (tokens per chunk); any row count works.

    Shapes: ``x`` ``[..., in]`` fp32 -> ``[..., out]`` fp32.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint),
                             persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (weight reordered back, bit-identical)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            layer.bias = self.bias
        return layer.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        if probe.device.type != "cpu" or probe.dtype != torch.float32:
            raise RuntimeError("a packed CPU linear cannot change device or dtype: load the model on that device "
                               "instead (load_embedded(device=...)) or use dense_linears() first")
        return super()._apply(fn, recurse)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _packable(model: nn.Module) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def _agrees(layer: nn.Linear, packed: PackedLinear, rows: int) -> bool:
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = layer(x), packed(x)
    return bool((got - want).abs().max() <= CHECK_RTOL * want.abs().max().clamp(min=1.0))


def pack_linears(model: nn.Module, rows_hint: int = 24, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the ``nn.Linear`` layers of a CPU fp32 ``model`` by :class:`PackedLinear`, in place.

    Args:
        model: e.g. a :class:`~.decoder.Decoder` on CPU in fp32.
        rows_hint: tokens per chunk the layout is tuned for.
        skip: names of child modules left dense (the LM head: one row per decoded token, and
            tied to the embedding table).

    Returns:
        layers packed; 0 where oneDNN is unavailable, the model is not CPU fp32, or the
        packed ops disagree with ``F.linear`` on the first layer (the model is then unchanged).
    """
    if not _packable(model):
        return 0
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
               and name.rsplit(".", 1)[-1] not in skip]
    if not targets:
        return 0
    try:
        first = PackedLinear(targets[0][1], rows_hint)
        if not _agrees(targets[0][1], first, rows_hint):
            log.warning("oneDNN packed linear disagrees with F.linear; keeping dense weights")
            return 0
    except RuntimeError as exc:  # an op missing in this build
        log.warning("oneDNN packed linear unavailable (%s); keeping dense weights", exc)
        return 0
    for name, mod in targets:
        _replace(model, name, PackedLinear(mod, rows_hint))
    return len(targets)


@contextmanager
def dense_linears(model: nn.Module):
    """Within the block ``model`` has dense ``nn.Linear`` layers again (exact weights); packed
    ones are restored after it. A no-op for a model that was not packed."""
    swapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, PackedLinear)]
    for name, mod in swapped:
        _replace(model, name, mod.dense())
    try:
        yield model
    finally:
        for name, mod in swapped:
            _replace(model, name, mod)
