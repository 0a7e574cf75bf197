"""ONNX export of the decoder step (:class:`DecoderStep`) and an onnxruntime runner for it.

The graph has static KV-buffer inputs ``[layers, kv_heads, slots, head_dim]`` and a dynamic
chunk length ``n`` in ``1..max_chunk``. Opset 18: inside what TensorRT 10 (JetPack 6 ships
10.3) parses. onnxruntime checks the graph here against the torch step; TensorRT needs the
Jetson or a GPU machine with TensorRT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.cpu_gemm import dense_linears
from ..models.decoder import Decoder
from .decoder_step import INPUTS, OUTPUTS, DecoderStep
from .identity import StepIdentity

OPSET = 18


def example_inputs(decoder: Decoder, slots: int, n: int) -> tuple[torch.Tensor, ...]:
    """Zero inputs of the step's shapes: embeds ``[1, n, hidden]``, K/V buffers, length ``[1]``."""
    cfg = decoder.cfg
    dtype = next(decoder.parameters()).dtype
    buf = torch.zeros(cfg.num_layers, cfg.num_kv_heads, slots, cfg.head_dim, dtype=dtype)
    return (torch.zeros(1, n, cfg.hidden_size, dtype=dtype), buf, buf.clone(), torch.zeros(1, dtype=torch.int64))


def export_decoder_step(decoder: Decoder, path: str | Path, identity: StepIdentity) -> Path:
    """Write the decoder step of ``decoder`` as one ONNX file (weights inside), its identity in
    the file's metadata.

    Args:
        decoder: the model, on CPU (packed CPU linears are exported as their dense weights).
        path: output ``.onnx`` path.
        identity: what the step is for (:meth:`StepIdentity.of` of ``decoder``): its slots are
            static in the graph, its chunk length ``n`` dynamic in ``1..max_chunk``, its
            window-score rule (``beta``, ``normalise``) baked in.

    Returns:
        the written path.

    Raises:
        ValueError: ``max_chunk`` outside ``1..slots``.
    """
    slots, max_chunk = identity.slots, identity.max_chunk
    if not 1 <= max_chunk <= slots:
        raise ValueError(f"max_chunk {max_chunk} must be in 1..slots ({slots})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = DecoderStep(decoder, identity.beta, identity.normalise).eval()
    n = torch.export.Dim("n", min=1, max=max_chunk)
    with torch.inference_mode(False), torch.no_grad(), dense_linears(decoder):  # the graph holds dense weights
        program = torch.onnx.export(
            step, example_inputs(decoder, slots, min(2, max_chunk)), dynamo=True, opset_version=OPSET,
            input_names=list(INPUTS), output_names=list(OUTPUTS), external_data=False,
            dynamic_shapes={"embeds": {1: n}, "k_cache": None, "v_cache": None, "length": None})
    program.model.metadata_props.update(identity.metadata())
    program.save(str(path))
    return path


class OrtDecoderStep:
    """Runs an exported decoder step with onnxruntime (CPU), torch tensors in and out.

    Args:
        path: ``.onnx`` file from :func:`export_decoder_step`.
        threads: intra-op threads (0 = onnxruntime's default).

    Raises:
        FileNotFoundError: no file at ``path``.
        RuntimeError: onnxruntime cannot load it (corrupt or not a decoder step); the message
            names the file.
    """

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX decoder step not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RuntimeError(f"onnxruntime cannot load {path}: {exc}") from exc
        names = tuple(i.name for i in self.session.get_inputs())
        if names != INPUTS:
            raise RuntimeError(f"{path} is not a decoder step: inputs {names}, expected {INPUTS}")
        self.path = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def check(self, expected: StepIdentity) -> None:
        """Raise ValueError naming every field where this step differs from ``expected`` (the
        identity of the model and cache it is meant to serve)."""
        wrong = [f"{k}: engine {self.metadata.get(k, 'missing')}, wanted {v}" for k, v in expected.metadata().items()
                 if self.metadata.get(k) != v]
        if wrong:
            raise ValueError(f"{self.path} was built for another model or cache ({'; '.join(wrong)}); "
                             "re-export it (infmllm_ros.engines.onnx_export)")

    def __call__(self, embeds: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 length: int) -> tuple[torch.Tensor, ...]:
        """Same contract as :class:`DecoderStep` (``length`` as an int); CPU torch tensors out."""
        feeds = {"embeds": embeds.numpy(), "k_cache": k_cache.numpy(), "v_cache": v_cache.numpy(),
                 "length": np.array([length], dtype=np.int64)}
        return tuple(torch.from_numpy(x) for x in self.session.run(list(OUTPUTS), feeds))
