"""`r1mega convert hf-to-mcore | mcore-to-hf`: checkpoint conversion that checks itself.

    r1mega convert hf-to-mcore --hf DIR --out DIR [--no-verify] [--tp N --pp N]
    r1mega convert mcore-to-hf --ckpt DIR --out DIR [--no-verify] [--dtype bf16|fp16|fp32]

Verification is on by default: transformers (the reference implementation) and our model run the
same tokens and the conversion fails above --max-abs-tol / --kl-tol, leaving nothing at --out.
One process converts at TP=PP=1 (the result loads onto any layout); ``torchrun --nproc-per-node
N ... --tp N`` runs the same conversion sharded, e.g. to check a layout end to end.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from r1mega.convert.families import ConversionError
from r1mega.convert.verify import DEFAULT_KL_TOL, DEFAULT_MAX_ABS_TOL

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32",
           "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1mega convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)

    def common(sp):
        sp.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
        sp.add_argument("--no-verify", action="store_true", help="skip the logits check against transformers")
        sp.add_argument("--max-abs-tol", type=float, default=DEFAULT_MAX_ABS_TOL)
        sp.add_argument("--kl-tol", type=float, default=DEFAULT_KL_TOL)
        sp.add_argument("--verify-tokens", type=int, default=16, help="sequence length of the probe batch")
        sp.add_argument("--tp", type=int, default=1, help="tensor parallel size (launch that many ranks)")
        sp.add_argument("--pp", type=int, default=1, help="pipeline parallel size (verification needs 1)")
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    h = sub.add_parser("hf-to-mcore", help="Hugging Face dir -> r1mega/megatron dist checkpoint")
    h.add_argument("--hf", required=True, help="HF model dir: config.json + safetensors (+ tokenizer)")
    h.add_argument("--spec", default="local", choices=["local", "te", "auto"],
                   help="layer spec the checkpoint's parameter names follow")
    common(h)
    m = sub.add_parser("mcore-to-hf", help="r1mega/megatron dist checkpoint -> Hugging Face dir")
    m.add_argument("--ckpt", required=True, help="checkpoint dir with meta.json and model/")
    m.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="dtype of the HF weights (default: the dtype the HF source had, else bf16)")
    m.add_argument("--max-shard-gb", type=float, default=5.0)
    common(m)
    return p


def _init(tp: int, pp: int):
    from r1mega.config import ConfigError, ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import init_parallel

    env = read_launch_env()
    if env.world_size != tp * pp:
        raise ConfigError(f"--tp {tp} --pp {pp} needs {tp * pp} ranks but {env.world_size} were launched; "
                          f"run `torchrun --nproc-per-node {tp * pp} -m r1mega.cli convert ...` "
                          f"or drop --tp/--pp (one process converts for every layout).")
    # fp32 parameters: bf16/fp16/fp32 sources all round-trip bit-exactly through fp32.
    return init_parallel(ParallelConfig(tensor=tp, pipeline=pp), PrecisionConfig(dtype="fp32"), env=env)


def _say(ctx, text: str) -> None:
    if ctx is None or ctx.rank == 0:
        print(f"[r1mega convert] {text}", flush=True)


def hf_to_mcore(args) -> int:
    import dataclasses

    from r1mega.convert import hf_io
    from r1mega.convert.hf_bridge import load_hf_into_model, uses_te_names
    from r1mega.convert.hf_config import model_config_from_hf
    from r1mega.convert.mcore_io import save_model_state
    from r1mega.convert.verify import verify_against_hf
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel

    t0 = time.perf_counter()
    hf_io.check_output_free(args.out, args.overwrite)
    ckpt = hf_io.HFCheckpoint(args.hf)  # config, index and shards checked before any work
    model_cfg = model_config_from_hf(ckpt.config)
    model_cfg.spec = args.spec
    ctx = _init(args.tp, args.pp)
    try:
        chunks = build_model(model_cfg, ctx, wrap=False)
        info = load_hf_into_model(chunks, ckpt, model_cfg, ctx)
        _say(ctx, f"loaded {info['num_hf_tensors']} HF tensors ({info['hf_dtype']}) from {args.hf} "
                  f"into {model_cfg.family} model, TP={ctx.tp_size} PP={ctx.pp_size}")
        report = None
        if not args.no_verify:
            report = verify_against_hf(chunks, args.hf, model_cfg, ctx, seq_len=args.verify_tokens,
                                       max_abs_tol=args.max_abs_tol, kl_tol=args.kl_tol)
            _say(ctx, report.line())
        hf_dtype = hf_io.dtype_name(info["hf_dtype"])

        def add_assets(tmp: str) -> None:
            assets = os.path.join(tmp, "hf_assets")
            hf_io.carry_files(args.hf, assets)
            import json

            with open(os.path.join(assets, "config.json"), "w") as f:
                json.dump(ckpt.config, f, indent=2)

        save_model_state(
            chunks, args.out, model_cfg, add_files=add_assets, overwrite=args.overwrite,
            extra_meta={"written_by_tool": "r1mega convert hf-to-mcore",
                        "hf_source": os.path.abspath(args.hf), "hf_dtype": hf_dtype,
                        "spec_impl": "te" if uses_te_names(chunks) else "local",
                        "verify": dataclasses.asdict(report) if report else None},
        )
        _say(ctx, f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    finally:
        destroy_parallel()
    return 0


def mcore_to_hf(args) -> int:
    from r1mega.convert import hf_io
    from r1mega.convert.hf_bridge import export_hf
    from r1mega.convert.mcore_io import load_model_state, model_config_from_meta, read_meta
    from r1mega.convert.verify import verify_against_hf
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel

    t0 = time.perf_counter()
    hf_io.check_output_free(args.out, args.overwrite)
    meta = read_meta(args.ckpt)
    model_cfg = model_config_from_meta(meta)
    if meta.get("spec_impl"):
        model_cfg.spec = meta["spec_impl"]  # parameter names must match what was saved
    dtype_name = _DTYPES[args.dtype] if args.dtype else meta.get("hf_dtype", "bfloat16")
    dtype = hf_io.dtype_from_name(dtype_name)
    assets = os.path.join(args.ckpt, "hf_assets")
    original = hf_io.read_json(os.path.join(assets, "config.json"))
    ctx = _init(args.tp, args.pp)
    try:
        chunks = build_model(model_cfg, ctx, wrap=False)
        load_model_state(chunks, args.ckpt, strict=True)
        _say(ctx, f"loaded {args.ckpt} ({model_cfg.family}, {model_cfg.num_layers} layers)")
        reports = []

        def check(tmp_dir: str) -> None:
            # Runs on the complete temp dir, before it is renamed onto --out. Only the writer
            # rank (0) gets here, so this verification needs a one-rank model.
            reports.append(verify_against_hf(chunks, tmp_dir, model_cfg, ctx, seq_len=args.verify_tokens,
                                             max_abs_tol=args.max_abs_tol, kl_tol=args.kl_tol))
            _say(ctx, reports[-1].line())
            if dtype != torch.float32:
                _say(ctx, f"(verified in fp32 on {dtype_name} weights: rounding to {dtype_name} is part "
                          f"of the measured difference)")

        verify = not args.no_verify
        if verify and ctx.world_size > 1:
            raise ConversionError("mcore-to-hf verifies on one rank; run it without torchrun "
                                  "(any checkpoint layout loads at TP=PP=1) or pass --no-verify.")
        export_hf(chunks, model_cfg, ctx, args.out, dtype=dtype, assets_dir=assets,
                  original_config=original, check=check if verify else None,
                  overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 2**30))
        _say(ctx, f"wrote {args.out} ({dtype_name}) in {time.perf_counter() - t0:.1f} s")
    finally:
        destroy_parallel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    run = hf_to_mcore if args.direction == "hf-to-mcore" else mcore_to_hf
    try:
        return run(args)
    except ConversionError as exc:
        from r1mega.errors import debug_enabled, report_user_error

        if debug_enabled():
            raise
        return report_user_error(exc, f"r1mega convert {args.direction}: error")


if __name__ == "__main__":
    sys.exit(main())
