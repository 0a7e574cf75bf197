"""infmllm-build-engines: export the decoder step and build its TensorRT engine on this device.

Run on the Jetson the engine will serve (an engine is tied to its GPU and TensorRT version):

    infmllm-build-engines --model smollm2-135m --capacity 2048 --max-chunk 64 --out engines

Writes the step's ONNX file and its ``.engine`` beside it, both named by the step's identity
(:class:`~.identity.StepIdentity`: model, dtype, slots, chunk, window-score rule), a shared
timing cache, and the entry in ``OUT/manifest.json`` that the node's ``tensorrt`` backend
selects by (that identity, the TensorRT version and the GPU).
Exit status 2 with the reason when TensorRT or CUDA is missing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..kvcache import DEFAULT_SLACK, POLICIES, KVCache, make_policy
from ..kvcache.policies import MEMORY_BETA, PolicySettingError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model preset or GGUF path (as the node's `model`)")
    ap.add_argument("--capacity", type=int, default=2048, help="KV-cache capacity (tokens), as cache.capacity")
    ap.add_argument("--max-chunk", type=int, default=64, help="largest chunk (tokens), as cache.max_chunk")
    ap.add_argument("--slack", type=int, default=DEFAULT_SLACK, help="lazy-eviction slack (tokens), as cache.slack")
    ap.add_argument("--policy", default="inf_mllm", choices=sorted(POLICIES), help="as cache.policy")
    ap.add_argument("--beta", type=float, default=MEMORY_BETA, help="as cache.beta")
    ap.add_argument("--precision", default="fp16", choices=("fp16", "fp32"))
    ap.add_argument("--workspace-gib", type=float, default=2.0, help="builder workspace limit (GiB)")
    ap.add_argument("--out", default="engines", help="engine folder (the node's engine_dir)")
    args = ap.parse_args(argv)

    from .tensorrt_engine import add_to_manifest, build_engine, engine_key, require_tensorrt

    try:  # the cache's rules for what the engine depends on, before anything is loaded
        policy = make_policy(args.policy, sinks=0, recent=0, beta=args.beta)  # sinks/recent: not in the engine
        KVCache.check_settings(args.capacity, args.max_chunk, args.slack, policy)
    except PolicySettingError as exc:
        print(f"infmllm-build-engines: --{exc.setting.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    try:
        require_tensorrt()
        import tensorrt
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: engines are built on the GPU they will run on")
    except RuntimeError as exc:
        print(f"infmllm-build-engines: {exc}", file=sys.stderr)
        return 2
    from ..models import PRESETS, load_gguf
    from .identity import StepIdentity
    from .onnx_export import export_decoder_step

    path = PRESETS[args.model]() if args.model in PRESETS else Path(args.model)
    if not path.is_file():
        print(f"infmllm-build-engines: model {args.model!r} is neither a preset ({', '.join(PRESETS)}) "
              f"nor a GGUF file", file=sys.stderr)
        return 2
    decoder, _ = load_gguf(path)
    if args.precision == "fp16":
        decoder = decoder.half()
    slots = KVCache.buffer_slots(args.capacity, args.max_chunk, args.slack, policy)
    identity = StepIdentity.of(path.stem, decoder, slots, args.max_chunk, policy)
    out = Path(args.out)
    onnx_path = out / f"{identity.stem()}.onnx"
    print(f"[1/2] exporting the decoder step to {onnx_path} ...", flush=True)
    export_decoder_step(decoder, onnx_path, identity)
    print("[2/2] building the TensorRT engine (minutes) ...", flush=True)
    engine = build_engine(onnx_path, out / f"{identity.stem()}.engine", hidden=decoder.cfg.hidden_size,
                          max_chunk=args.max_chunk, fp16=args.precision == "fp16",
                          workspace_bytes=int(args.workspace_gib * 2**30), timing_cache=out / "timing.cache")
    add_to_manifest(out, engine_key(identity, tensorrt.__version__, torch.cuda.get_device_name()), engine.name)
    print(f"wrote {engine} and its entry in {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
