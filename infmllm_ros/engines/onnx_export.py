"""ONNX export of a model's three engines, and an onnxruntime runner for each.

* the decoder step (:class:`~.decoder_step.DecoderStep`): static KV-buffer inputs
  ``[layers, kv_heads, slots, head_dim]``, a dynamic chunk length ``n`` in ``1..max_chunk``, RoPE
  positions ``[3, n]`` as an input (M-RoPE and 1-D families alike);
* the vision tower and projector (:meth:`VisionLanguageModel.vision_tower`) at the family's
  frame size: static pixel input(s) ``pixels0, ...``, outputs ``vision0, ...``;
* the token-embedding lookup: ``ids`` int64 ``[n]`` -> ``embeds`` ``[n, hidden]``.

Graphs come from ``torch.onnx.export``: the dynamo exporter (``torch.export`` + onnxscript)
where the module traces as data, the TorchScript tracer for a tower that loops in Python over its
image grid (:attr:`VisionLanguageModel.vision_traced`). Opset 18: inside what TensorRT 10
(JetPack 6 ships 10.3) parses. Each file carries its :class:`~.identity.StepIdentity` key in its
metadata properties; a graph whose weights pass 2 GiB keeps them in ``<file>.data`` beside it
(ONNX external data). onnxruntime checks every graph here against torch (``test/test_engine_families.py``);
TensorRT builds the same files on the device (:mod:`.tensorrt_engine`).
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch

from ..models.cpu_gemm import dense_linears
from ..models.decoder import Decoder
from .decoder_step import INPUTS, OUTPUTS, DecoderStep, step_inputs
from .identity import StepIdentity, example_frame

if TYPE_CHECKING:
    from ..models.family import VisionLanguageModel

OPSET = 18
#: Weights above this size go to an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
#: The input names each engine kind may have (a vision engine's are ``pixels0..``).
KIND_INPUTS = {"step": (INPUTS, INPUTS + ("deepstack",)), "embed": (("ids",),)}


def example_inputs(decoder: Decoder, slots: int, n: int) -> tuple[torch.Tensor, ...]:
    """Zero inputs of the step's shapes: embeds ``[1, n, hidden]``, K/V buffers, length ``[1]``,
    positions ``[3, n]``, and a DeepStack model's ``deepstack`` ``[layers, n, hidden]``."""
    cfg = decoder.cfg
    dtype = next(decoder.parameters()).dtype
    buf = torch.zeros(cfg.num_layers, cfg.num_kv_heads, slots, cfg.head_dim, dtype=dtype)
    deepstack = (torch.zeros(cfg.deepstack_layers, n, cfg.hidden_size, dtype=dtype),) if cfg.deepstack_layers else ()
    return (
        torch.zeros(1, n, cfg.hidden_size, dtype=dtype),
        buf,
        buf.clone(),
        torch.zeros(1, dtype=torch.int64),
        torch.arange(n).expand(3, n).contiguous(),
        *deepstack,
    )


def _save(proto: onnx.ModelProto, path: Path, metadata: dict[str, str], data_name: str | None) -> Path:
    """Write ``proto`` with ``metadata`` to ``path``; weights over :data:`EXTERNAL_DATA_BYTES` to
    ``data_name`` (default ``<path name>.data``) in the same folder."""
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items())
    big = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=data_name or f"{path.name}.data",
    )
    return path


@contextlib.contextmanager
def _without_slices_split() -> Iterator[None]:
    """Leave onnxscript's ``SlicesSplit`` rewrite out of the exporter's optimizer while inside.

    The rule turns two Slices of one tensor into a Split. It is a two-output pattern, matched over
    pairs of Slice nodes, and a step graph holds hundreds of Slices (SmolLM2-135M: 241): the rule
    took half of that model's export time, and rewrote nothing. Each engine of the six families
    here was exported with it and without, and the files were byte-identical;
    ``test/test_engines.py`` checks the tiny step's. Every other rule runs as
    ``torch.onnx.export`` runs it. Where onnxscript keeps its rules elsewhere, nothing is
    changed and the export is slower.
    """
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if r is not slice_split_rule)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _dynamo_export(
    module: torch.nn.Module, args: tuple, names: tuple[Sequence[str], Sequence[str]], dynamic_shapes: dict | None
) -> onnx.ModelProto:
    with torch.inference_mode(False), torch.no_grad(), _without_slices_split():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(names[0]),
            output_names=list(names[1]),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    return program.model_proto


def export_decoder_step(
    decoder: Decoder, path: str | Path, identity: StepIdentity, data_name: str | None = None
) -> Path:
    """Write the decoder step of ``decoder`` as one ONNX file, its identity in the metadata.

    Args:
        decoder: the model, on CPU (packed CPU linears are exported as their dense weights).
        path: output ``.onnx`` path.
        identity: what the step is for (:meth:`StepIdentity.of`): its slots are static in the
            graph, its chunk length ``n`` dynamic in ``1..max_chunk``, its window-score rule
            (``beta``, ``normalise``) baked in.
        data_name: external data file name for a graph over 1 GiB of weights (default
            ``<path name>.data``; an atomic write names the final file's).

    Returns:
        the written path.

    Raises:
        ValueError: ``max_chunk`` outside ``1..slots``.
    """
    slots, max_chunk = identity.slots, identity.max_chunk
    if not 1 <= max_chunk <= slots:
        raise ValueError(f"max_chunk {max_chunk} must be in 1..slots ({slots})")
    step = DecoderStep(decoder, identity.beta, identity.normalise).eval()
    n = torch.export.Dim("n", min=1, max=max_chunk)
    names = step_inputs(decoder.cfg)
    dynamic = {
        "embeds": {1: n},
        "k_cache": None,
        "v_cache": None,
        "length": None,
        "positions": {1: n},
        "deepstack": {1: n},
    }
    with dense_linears(decoder):  # the graph holds dense weights
        proto = _dynamo_export(
            step, example_inputs(decoder, slots, min(2, max_chunk)), (names, OUTPUTS), {k: dynamic[k] for k in names}
        )
    return _save(proto, Path(path), identity.metadata("step"), data_name)


class _Embedding(torch.nn.Module):
    def __init__(self, decoder: Decoder):
        super().__init__()
        self.table = decoder.model.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


def export_embedding(decoder: Decoder, path: str | Path, identity: StepIdentity, data_name: str | None = None) -> Path:
    """Write ``decoder``'s token-embedding lookup (``ids`` int64 ``[n]`` -> ``embeds`` ``[n, hidden]``,
    ``n`` dynamic up to the buffer's slots) as an ONNX file. Arguments as :func:`export_decoder_step`."""
    n = torch.export.Dim("n", min=1, max=max(2, identity.slots))
    proto = _dynamo_export(
        _Embedding(decoder), (torch.zeros(2, dtype=torch.int64),), (("ids",), ("embeds",)), {"ids": {0: n}}
    )
    return _save(proto, Path(path), identity.metadata("embed"), data_name)


def export_vision(
    model: VisionLanguageModel, path: str | Path, identity: StepIdentity, data_name: str | None = None
) -> Path:
    """Write ``model``'s vision tower and projector at its engine frame size
    (:attr:`VisionLanguageModel.engine_frame_size`) as an ONNX file: static inputs ``pixels0..``
    (the family processor's tensors for one frame), outputs ``vision0..`` (what the tower
    returns). Arguments as :func:`export_decoder_step`.

    Raises:
        NotImplementedError: the family has no vision tower to export.
    """
    inputs = model.vision_inputs(example_frame(model.engine_frame_size))
    tower = model.vision_tower(inputs).eval()
    with torch.no_grad():
        out = tower(*inputs.pixels)
    n_out = len(out) if isinstance(out, tuple) else 1
    names = ([f"pixels{i}" for i in range(len(inputs.pixels))], [f"vision{i}" for i in range(n_out)])
    path = Path(path)
    if not model.vision_traced:
        proto = _dynamo_export(tower, inputs.pixels, names, None)
    else:
        # into a folder of its own: over 2 GiB the tracer writes a data file per weight beside the graph
        with tempfile.TemporaryDirectory(dir=path.parent) as folder, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the grid loops it records as constants
            torch.onnx.export(
                tower,
                inputs.pixels,
                f"{folder}/vision.onnx",
                dynamo=False,
                opset_version=OPSET,
                input_names=names[0],
                output_names=names[1],
            )
            proto = onnx.load(f"{folder}/vision.onnx")
    return _save(proto, path, identity.metadata("vision"), data_name)


class OrtEngine:
    """One exported engine on onnxruntime (CPU), its identity checked.

    Args:
        path: ``.onnx`` file from one of this module's exports.
        kind: ``step``, ``vision`` or ``embed`` (the inputs it must have).
        threads: intra-op threads; default torch's (``torch.get_num_threads()``, set by
            ``torch.set_num_threads`` or ``OMP_NUM_THREADS``), so that one setting governs both CPU
            backends. onnxruntime's own default is every physical core, its workers spinning
            between runs: on a CPU shared with other work (two test workers on two cores) that
            doubled the CPU time of a SmolLM2 stream at the same wall time.

    Raises:
        FileNotFoundError: no file at ``path``.
        RuntimeError: onnxruntime cannot load it (corrupt, cut short, or not an engine of
            ``kind``); the message names the file.
    """

    def __init__(self, path: str | Path, kind: str, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX {kind} engine not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeError(f"onnxruntime cannot load {path}: {exc}") from exc
        names = tuple(i.name for i in self.session.get_inputs())
        wanted = KIND_INPUTS.get(kind) or (tuple(f"pixels{i}" for i in range(len(names))),)
        if names not in wanted:
            raise RuntimeError(
                f"{path} is not a {kind} engine: inputs {names}, expected {' or '.join(map(str, wanted))}"
            )
        self.inputs = names
        self.path, self.kind = path, kind
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def check(self, expected: StepIdentity) -> None:
        """Raise ValueError naming every field where this engine differs from ``expected`` (the
        identity of the model and cache it is meant to serve)."""
        wrong = [
            f"{k}: engine {self.metadata.get(k, 'missing')}, wanted {v}"
            for k, v in expected.metadata(self.kind).items()
            if self.metadata.get(k) != v
        ]
        if wrong:
            raise ValueError(
                f"{self.path} was built for another model or cache ({'; '.join(wrong)}); "
                "re-export it (infmllm-build-engines --backend onnxruntime)"
            )

    def run(self, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The outputs for inputs in declaration order, as CPU torch tensors."""
        return tuple(torch.from_numpy(x) for x in self.session.run(self.outputs, dict(zip(self.inputs, arrays))))


class OrtDecoderStep(OrtEngine):
    """The decoder step on onnxruntime, called like :class:`~.decoder_step.DecoderStep`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__(path, "step", threads)

    def __call__(
        self,
        embeds: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        length: int,
        positions: torch.Tensor,
        deepstack: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Same contract as :class:`DecoderStep` (``length`` as an int); CPU torch tensors out."""
        extra = (deepstack.numpy(),) if deepstack is not None else ()
        return self.run(
            embeds.numpy(),
            k_cache.numpy(),
            v_cache.numpy(),
            np.array([length], dtype=np.int64),
            positions.numpy(),
            *extra,
        )


class OrtVision(OrtEngine):
    """A vision engine on onnxruntime: the :data:`~infmllm_ros.models.family.VisionRunner`
    :meth:`VisionLanguageModel.encode_frame` takes.

    Attributes:
        frame_size: ``(width, height)`` px frames are resized to first (from the identity), or
            None when the family's processor fixes the pixel shape.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__(path, "vision", threads)
        size = self.metadata.get("infmllm.frame_size", "any")
        self.frame_size = tuple(int(x) for x in size.split("x")) if "x" in size else None

    def __call__(self, *pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.run(*(p.detach().cpu().numpy() for p in pixels))


class OrtEmbedding(OrtEngine):
    """The token-embedding lookup on onnxruntime: ids int64 ``[n]`` -> ``[n, hidden]``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__(path, "embed", threads)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.run(ids.cpu().numpy())[0]
