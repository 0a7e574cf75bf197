"""CPU linear layers: fp32 weights prepacked for oneDNN, or weight-only int8.

**Packed fp32** (:func:`pack_linears`, the default on CPU).

A frame chunk is ~20 tokens, so every projection is a thin GEMM (``M`` ~ 20, ``K`` = 576,
``N`` up to 1536 for SmolLM2). MKL's ``sgemm`` behind ``nn.Linear`` runs these at a fraction of
the CPU's peak; oneDNN with the weight reordered once into its blocked layout for a given row
count runs them faster (a stored frame's cost: ``bench/results/README.md``, "Ingest and decode
cost"). The packed weight replaces the dense
one (same memory), and :func:`dense_linears` gives the model back its ``nn.Linear`` layers for
code that needs dense weights (ONNX export).

The two ops are PyTorch's own (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``, what Inductor's weight freezing emits on CPU); they are internal, so
:func:`pack_linears` checks them against ``F.linear`` once and leaves the model as it is if
they are missing or disagree.

**Weight-only int8** (:func:`quantize_linears`, ``precision: int8``). A decoded token is one
matrix-vector product per weight, so its time is the bytes of weights read: int8 reads a quarter
of fp32. Each output channel's weights are rounded to int8 with a scale ``max|w| / 127``
(symmetric, per channel); activations are not quantised but rounded to bf16, and torch's
``aten._weight_int8pack_mm`` (the kernel behind gpt-fast's and torchao's int8 weight-only path on
CPU) computes ``x @ (W_int8 * scale)^T`` with fp32 accumulation. Projections of the same input
are fused first (:func:`fuse_projections`: q/k/v, gate/up). The error is measured, not assumed:
perplexity next to fp32 in ``bench/results/README.md`` ("Streaming perplexity"), logits in
``test/test_cpu_gemm.py``. For chunks of ~25 rows the kernel is slower than packed fp32: int8 is
for decode-bound use.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Largest |packed - dense| output of the self-check, relative to the output's magnitude.
CHECK_RTOL = 1e-4


class CpuLinear(nn.Module):
    """A linear layer whose weight is held in a CPU-only form; it refuses to change device or
    dtype (its :meth:`dense` gives an ``nn.Linear`` that can)."""

    def dense(self) -> nn.Linear:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1))
        if probe.device.type != "cpu" or probe.dtype != torch.float32:
            raise RuntimeError(
                "a packed or int8 CPU linear cannot change device or dtype: load the model on that "
                "device instead (load_model(device=...)) or use dense_linears() first"
            )
        return super()._apply(fn, recurse)


class PackedLinear(CpuLinear):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout (CPU, fp32).

    Args:
        linear: the dense layer (its weight ``[out, in]`` fp32 on CPU); not modified.
        rows_hint: typical rows of ``x`` (tokens per chunk); any row count works.

    Shapes: ``x`` ``[..., in]`` fp32 -> ``[..., out]`` fp32.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint), persistent=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same product (weight reordered back, bit-identical)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(self.packed.to_dense(), requires_grad=False)
        if self.bias is not None:
            layer.bias = self.bias
        return layer.requires_grad_(False)


class Int8Linear(CpuLinear):
    """``y = x (s * W_q)^T + b`` with ``W_q`` int8 ``[out, in]`` and ``s`` one scale per output.

    Args:
        linear: the dense layer (CPU, float weight ``[out, in]``); not modified.

    Shapes and dtypes: ``x`` ``[..., in]`` float -> ``[..., out]`` in ``x``'s dtype; the product
    runs with ``x`` rounded to bf16 and fp32 accumulation.

    Raises:
        ValueError: a weight not on the CPU.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        if w.device.type != "cpu":
            raise ValueError(f"int8 weights are a CPU path; {w.device} weights run fp16/bf16 or a TensorRT engine")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_int8(w)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = (
            torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight_int8, self.scale
            )
            .to(x.dtype)
            .view(*shape[:-1], self.out_features)
        )
        return y if self.bias is None else y + self.bias

    def dense(self) -> nn.Linear:
        """The ``nn.Linear`` of the dequantised weight (what this layer computes, in fp32)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(self.weight_int8.float() * self.scale.float()[:, None], requires_grad=False)
        if self.bias is not None:
            layer.bias = self.bias
        return layer.requires_grad_(False)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a weight ``[out, in]``: ``(int8 [out, in], fp32 scale
    [out])`` with ``w ~ q * scale[:, None]``, ``scale = max|w_row| / 127`` (1 for an all-zero row)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _linears(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """``(name, layer)`` of every ``nn.Linear`` of ``model`` whose own name is not in ``skip``."""
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] not in skip
    ]


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
    """Replace the ``nn.Linear`` layers of a CPU fp32 ``model`` by :class:`PackedLinear`, in place,
    after :func:`fuse_projections` (fewer, longer products: a decoded token's matrix-vector
    products read the weights faster in one stream than in three).

    Args:
        model: e.g. a :class:`~.decoder.Decoder` on CPU in fp32.
        rows_hint: tokens per chunk the layout is tuned for.
        skip: names of child modules left dense (the LM head: one row per decoded token, and
            tied to the embedding table).

    Returns:
        layers packed; 0 where oneDNN is unavailable, the model is not CPU fp32, or the
        packed ops disagree with ``F.linear`` on the first layer (the model is then unchanged,
        unfused).
    """
    if not _packable(model):
        return 0
    targets = _linears(model, skip)
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
    fuse_projections(model)
    targets = _linears(model, skip)
    for name, mod in targets:
        _replace(model, name, PackedLinear(mod, rows_hint))
    return len(targets)


#: Projections read from the same input, fused into one matrix product: (parts, fused slot). A
#: decoder module that has the parts and the (empty) slot gets the rows of the parts stacked in
#: this order (:class:`~.decoder.Attention`, :class:`~.decoder.MLP`).
FUSIONS = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))


def fuse_projections(model: nn.Module) -> int:
    """Stack the rows of the projections in :data:`FUSIONS` into one ``nn.Linear`` per module, in
    place (the parts become None). One call per token instead of three (attention) and two (MLP):
    fewer dispatches, and one longer weight stream per matrix-vector product.

    Returns:
        fused projections made (0 for a model without the slots or already fused).
    """
    made = 0
    for module in list(model.modules()):
        for parts, slot in FUSIONS:
            layers = [getattr(module, p, None) for p in parts]
            if (
                slot not in module._modules
                or module._modules[slot] is not None
                or not all(isinstance(x, nn.Linear) for x in layers)
            ):
                continue
            fused = nn.Linear(
                layers[0].in_features,
                sum(x.out_features for x in layers),
                bias=layers[0].bias is not None,
                device=layers[0].weight.device,
                dtype=layers[0].weight.dtype,
            )
            fused.weight = nn.Parameter(torch.cat([x.weight.detach() for x in layers]), requires_grad=False)
            if fused.bias is not None:
                fused.bias = nn.Parameter(torch.cat([x.bias.detach() for x in layers]), requires_grad=False)
            setattr(module, slot, fused.requires_grad_(False))
            for p in parts:
                setattr(module, p, None)
            made += 1
    return made


def quantize_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` (and :class:`PackedLinear`) of a CPU ``model`` by an
    :class:`Int8Linear`, in place, after :func:`fuse_projections`; the LM head too (a tied
    embedding table stays float for the lookup, and the head gets its own int8 copy). Rows are
    scaled one by one, so fusing first changes no value.

    Returns:
        layers quantised.

    Raises:
        ValueError: the model is not on the CPU, or this torch has no ``_weight_int8pack_mm``.
    """
    p = next(model.parameters())
    if p.device.type != "cpu":
        raise ValueError(f"int8 weights are a CPU path; a model on {p.device} runs fp16/bf16 or a TensorRT engine")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ValueError(f"torch {torch.__version__} has no aten._weight_int8pack_mm: int8 weights need torch >= 2.4")
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, CpuLinear)]:
        _replace(model, name, mod.dense())
    fuse_projections(model)
    targets = _linears(model)
    for name, mod in targets:
        _replace(model, name, Int8Linear(mod))
    return len(targets)


@contextmanager
def dense_linears(model: nn.Module):
    """Within the block ``model`` has dense ``nn.Linear`` layers again (packed: the exact weights;
    int8: the dequantised ones); the CPU layers are restored after it. A no-op for a model of
    plain ``nn.Linear`` layers."""
    swapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, CpuLinear)]
    for name, mod in swapped:
        _replace(model, name, mod.dense())
    try:
        yield model
    finally:
        for name, mod in swapped:
            _replace(model, name, mod)
