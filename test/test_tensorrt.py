"""The TensorRT path: type-checked against the TensorRT 10 stubs, clear errors without TensorRT,
and the engine manifest that decides which engine a node may load.

TensorRT itself is not installed on these machines (nor on the GPU test machines), so nothing
here builds or runs an engine; see infmllm_ros/engines/tensorrt_engine.py.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infmllm_ros.engines import build
from infmllm_ros.engines.identity import StepIdentity
from infmllm_ros.engines.tensorrt_engine import (
    TrtDecoderStep,
    add_to_manifest,
    engine_key,
    read_manifest,
    require_tensorrt,
    select_engine,
)

ROOT = Path(__file__).resolve().parents[1]
TRT_MODULES = [
    "infmllm_ros/engines/tensorrt_engine.py",
    "infmllm_ros/engines/build.py",
    "infmllm_ros/runtime/backends.py",
]


def trt_installed() -> bool:
    try:
        require_tensorrt()
        return True
    except RuntimeError:
        return False


def stub_dir(tmp_path: Path) -> Path:
    """tensorrt-stubs 10.13.0.35.1's .pyi trees, copied where mypy finds them (the wheel ships
    them without py.typed), with its two syntax errors fixed: a parameter named ``in`` and a
    non-default parameter after defaults in ``add_scale_nd``."""
    out = tmp_path / "stubs"
    for pkg in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, (
            "tensorrt-stubs is not installed (make test installs it)"
        )
        shutil.copytree(next(iter(spec.submodule_search_locations)), out / pkg)
    pyi = out / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", pyi.read_text())
    pyi.write_text(
        text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    )
    return out


def mypy(files: list[str], stubs: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", *files],
        cwd=root,
        capture_output=True,
        text=True,
        env={"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"},
    )


def test_tensorrt_modules_type_check_against_the_tensorrt_10_stubs(tmp_path):
    stubs = stub_dir(tmp_path)
    proc = mypy(TRT_MODULES, stubs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The check has teeth: a call removed in TensorRT 10 and a misspelt enum fail it (checked on
    # a copy of the package, so the test never writes into the source tree).
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "infmllm_ros", copy / "infmllm_ros", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", copy)
    broken = copy / TRT_MODULES[0]
    broken.write_text(
        broken.read_text()
        .replace("execute_async_v3(", "execute_async_v2(")
        .replace("MemoryPoolType.WORKSPACE", "MemoryPoolType.WORKSPACES")
    )
    proc = mypy([TRT_MODULES[0]], stubs, root=copy)
    assert proc.returncode == 1
    assert "execute_async_v2" in proc.stdout and "WORKSPACES" in proc.stdout


@pytest.mark.skipif(trt_installed(), reason="checks the behaviour where TensorRT is absent")
def test_clear_errors_where_tensorrt_is_absent(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):
        TrtDecoderStep(tmp_path / "x.engine")
    from test_cache import tiny_decoder

    from infmllm_ros.kvcache import make_policy
    from infmllm_ros.runtime.backends import make_backend

    dec = tiny_decoder()
    with pytest.raises(RuntimeError, match="TensorRT is not installed"):  # what the node reports at start
        make_backend("tensorrt", dec, tmp_path).load_engines(dec.new_cache(40, 8, make_policy("inf_mllm", recent=8)))
    assert build.main(["--out", str(tmp_path)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing exported when the build cannot happen
    for bad, said in (
        (["--capacity", "8", "--max-chunk", "64"], "--capacity: capacity 8 is smaller than"),
        (["--slack", "-1"], "--slack: slack must be >= 0 tokens"),
        (["--beta", "-0.5"], "--beta: beta must be a finite number >= 0"),
    ):
        assert build.main(["--out", str(tmp_path), *bad]) == 2  # refused before TensorRT is looked for
        assert said in capsys.readouterr().err


def key(**change):
    ident = StepIdentity(
        model="SmolLM2-135M-Instruct.Q4_1",
        dtype="float16",
        slots=2112,
        max_chunk=64,
        beta=0.01,
        normalise=True,
        layers=30,
        kv_heads=3,
        head_dim=64,
        hidden=576,
        vocab=49152,
    )
    k = engine_key(ident, "step", "10.3.0", "Orin")
    return {**k, **{name: str(v) for name, v in change.items()}}


def test_manifest_selects_the_matching_engine_and_names_every_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="run infmllm-build-engines"):
        select_engine(tmp_path, key())
    (tmp_path / "a.engine").write_bytes(b"engine")
    add_to_manifest(tmp_path, key(), "a.engine")
    add_to_manifest(tmp_path, key(slots=1088), "b.engine")
    assert select_engine(tmp_path, key()) == tmp_path / "a.engine"
    with pytest.raises(ValueError, match=r"slots: engine 2112, wanted 4160; tensorrt: engine 10.3.0, wanted 10.7.0"):
        select_engine(tmp_path, key(slots=4160, tensorrt="10.7.0"))
    with pytest.raises(FileNotFoundError, match="b.engine is in the manifest but missing"):
        select_engine(tmp_path, key(slots=1088))
    add_to_manifest(tmp_path, key(), "a2.engine")  # rebuilding replaces the entry
    assert [e["file"] for e in read_manifest(tmp_path)] == ["b.engine", "a2.engine"]


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt engine manifest"):
        select_engine(tmp_path, key())
    (tmp_path / "manifest.json").write_text(json.dumps({"engines": [{"model": "x"}]}))
    with pytest.raises(ValueError, match="entries need a 'file'"):
        read_manifest(tmp_path)
