"""infmllm-build-engines: a model's engines (vision, embedding, decoder step) for a backend.

    infmllm-build-engines --model smollm2-135m|MODEL.gguf|HF_DIR --backend onnxruntime --out engines
    infmllm-build-engines --model HF_DIR --backend tensorrt --capacity 2048 --max-chunk 128 --out engines

``--backend onnxruntime`` exports the three ONNX graphs the node's ``onnxruntime`` backend runs
(the node also exports them itself on a first start; this does it ahead of time). ``--backend
tensorrt`` (on the Jetson the engines will serve: an engine is tied to its GPU and TensorRT
version) exports the same graphs and builds each into a ``.engine``, with a shared timing cache
and an entry per engine in ``OUT/manifest.json`` that the node's ``tensorrt`` backend selects by
(the engine's identity, the TensorRT version and the GPU). Every file is named by its identity
(:class:`~.identity.StepIdentity`: model, family, checkpoint, dtype, frame size, slots, chunk,
window-score rule). Exit status 2 with the reason for a model that cannot be read, a bad
setting, or TensorRT / CUDA / onnxruntime missing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..kvcache import DEFAULT_SLACK, POLICIES, KVCache, make_policy
from ..kvcache.policies import MEMORY_BETA, PolicySettingError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="model preset, GGUF file or Hugging Face checkpoint folder (as the node's `model`)",
    )
    ap.add_argument(
        "--backend",
        default="tensorrt",
        choices=("onnxruntime", "tensorrt"),
        help="which runtime the engines are for (as the node's `backend`)",
    )
    ap.add_argument("--capacity", type=int, default=2048, help="KV-cache capacity (tokens), as cache.capacity")
    ap.add_argument("--max-chunk", type=int, default=64, help="largest chunk (tokens), as cache.max_chunk")
    ap.add_argument("--slack", type=int, default=DEFAULT_SLACK, help="lazy-eviction slack (tokens), as cache.slack")
    ap.add_argument("--policy", default="inf_mllm", choices=sorted(POLICIES), help="as cache.policy")
    ap.add_argument("--beta", type=float, default=MEMORY_BETA, help="as cache.beta")
    ap.add_argument(
        "--precision",
        default="fp16",
        choices=("fp16", "fp32"),
        help="TensorRT weight and KV dtype (onnxruntime graphs are fp32)",
    )
    ap.add_argument("--workspace-gib", type=float, default=2.0, help="builder workspace limit (GiB)")
    ap.add_argument("--out", default="engines", help="engine folder (the node's engine_dir)")
    args = ap.parse_args(argv)

    try:  # the cache's rules for what the engine depends on, before anything is loaded
        policy = make_policy(args.policy, sinks=0, recent=0, beta=args.beta)  # sinks/recent: not in the engine
        KVCache.check_settings(args.capacity, args.max_chunk, args.slack, policy)
    except PolicySettingError as exc:
        print(f"infmllm-build-engines: --{exc.setting.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.backend == "tensorrt":
            from .tensorrt_engine import require_tensorrt

            require_tensorrt()
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device: engines are built on the GPU they will run on")
        else:
            import onnxruntime  # noqa: F401
    except (RuntimeError, ImportError) as exc:
        print(f"infmllm-build-engines: {exc}", file=sys.stderr)
        return 2
    from ..models import load_model

    half = args.precision == "fp16" and args.backend == "tensorrt"
    try:
        model = load_model(args.model, "cpu", "fp16" if half else "fp32")
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"infmllm-build-engines: --model: {exc}", file=sys.stderr)
        return 2
    if half:
        model.decoder.half()  # a GGUF model loads as fp32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = model.decoder.new_cache(args.capacity, args.max_chunk, policy, slack=args.slack)
    if args.backend == "onnxruntime":
        from ..runtime.backends import OnnxRuntimeBackend

        t0 = time.perf_counter()
        OnnxRuntimeBackend(
            model.decoder, out, model.name, progress=lambda line: print(line, flush=True), model=model
        ).load_engines(cache)
        print(f"engines for {model.name} ready in {out} ({time.perf_counter() - t0:.0f} s)")
        return 0
    return build_tensorrt(model, cache, out, args)


def build_tensorrt(model, cache: KVCache, out: Path, args: argparse.Namespace) -> int:
    """Export the model's three graphs into ``out`` and build each engine (see the module docstring)."""
    import tensorrt
    import torch

    from . import onnx_export as ox
    from .identity import StepIdentity
    from .tensorrt_engine import add_to_manifest, build_engine, embed_profile, engine_key, step_profile

    identity = StepIdentity.for_cache(model.name, model.decoder, cache, model)
    cfg = model.decoder.cfg
    graphs = {
        "vision": (lambda p: ox.export_vision(model, p, identity), None),
        "embed": (lambda p: ox.export_embedding(model.decoder, p, identity), embed_profile(args.max_chunk)),
        "step": (
            lambda p: ox.export_decoder_step(model.decoder, p, identity),
            step_profile(cfg.hidden_size, args.max_chunk, cfg.deepstack_layers),
        ),
    }
    gpu = torch.cuda.get_device_name()
    for i, (kind, (export, profile)) in enumerate(graphs.items(), 1):
        onnx_path = out / f"{identity.stem(kind)}.onnx"
        print(f"[{i}/3] exporting the {kind} graph to {onnx_path}, then building its engine (minutes) ...", flush=True)
        export(onnx_path)
        engine = build_engine(
            onnx_path,
            out / f"{identity.stem(kind)}.engine",
            profile=profile,
            fp16=args.precision == "fp16",
            workspace_bytes=int(args.workspace_gib * 2**30),
            timing_cache=out / "timing.cache",
        )
        add_to_manifest(out, engine_key(identity, kind, tensorrt.__version__, gpu), engine.name)
    print(f"wrote the engines of {model.name} and their entries in {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
