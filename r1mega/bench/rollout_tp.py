"""`r1mega bench rollout-tp`: r1mega's rollout engine under tensor parallelism (torchrun).

    torchrun --nproc-per-node 4 -m r1mega.cli bench rollout-tp --model 852m

``r1mega bench rollout`` is the one-process comparison with transformers; this runs the same
engine on every rank of the launch as one tensor-parallel group (TP = the world size: weights,
KV heads and the vocabulary split over the ranks, the sampled token broadcast inside the
engine) and reports what TP buys on one model: tokens/s and the fraction of the decode roofline
of ONE rank (its weight shard once per decode step plus its share of the KV cache, at the
device-copy bandwidth measured on rank 0). The prompts are the same random ids as the rollout
bench's; every sequence runs to --setting's new-token count (no EOS).

``--smoke`` runs the tiny variant on CPU (gloo, fp32, eager) to check the script end to end.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from r1mega.bench.shapes import get_shape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench rollout-tp", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="852m", help="a shape of r1mega/bench/shapes.py")
    ap.add_argument("--setting", default="256x128x256", help="PROMPTSxPROMPT_TOKENSxNEW_TOKENS")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    ap.add_argument("--no-compile", action="store_true", help="rollout.compile_decode=false")
    ap.add_argument("--label", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny shape (CPU check of the script)")
    args = ap.parse_args(argv)

    from r1mega.bench.rollout import copy_bandwidth, decode_bytes
    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.cpu_mode import cpu_mode_enabled
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    env = read_launch_env()
    shape = get_shape(args.model, smoke=args.smoke)
    prompts, plen, new = (int(x) for x in args.setting.split("x"))
    if args.smoke:
        prompts, plen, new = 4, 8, 8
    rt = init_parallel(ParallelConfig(tensor=env.world_size), PrecisionConfig(), env=env)
    device = rt.device
    mcfg = ModelConfig(**{**shape, "max_position_embeddings": plen + new + 8})
    model = build_model(mcfg, rt, wrap=False)
    # This rank's shard: what one rank reads per decode step.
    weight_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    elem = torch.empty((), dtype=rt.dtype).element_size()
    head_dim = shape.get("kv_channels") or shape["hidden_size"] // shape["num_attention_heads"]
    kv_heads = max(1, shape["num_query_groups"] // rt.tp_size)  # fewer groups than ranks: replicated
    kv_per_token = 2 * shape["num_layers"] * kv_heads * head_dim * elem
    bw = copy_bandwidth(device)
    g = torch.Generator().manual_seed(prompts)  # the rollout bench's prompts
    ids = torch.randint(0, shape["vocab_size"], (prompts, plen), generator=g).tolist()
    rcfg = RolloutConfig(temperature=1.0, max_new_tokens=new, kv_memory_fraction=0.5,
                         max_batch_sequences=max(256, prompts), cuda_graphs=not args.no_graphs,
                         compile_decode=not args.no_compile and device.type == "cuda",
                         max_prefill_tokens=max(16384, prompts * plen // 4))
    eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=shape["vocab_size"])
    t = time.perf_counter()
    eng.generate([GenerationRequest(p, n=1, seed=i + 7919) for i, p in enumerate(ids)])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    dist.barrier()
    t = time.perf_counter()
    outs = eng.generate([GenerationRequest(p, n=1, seed=i) for i, p in enumerate(ids)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    t_max = torch.tensor([dt], dtype=torch.float64, device=device)
    dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
    dt = float(t_max.item())
    n_new = sum(len(c.token_ids) for c in outs)
    stats = dict(eng.stats)
    # TP ranks must agree on every token (they sample from the same gathered logits).
    digest = torch.tensor([float(sum(sum(c.token_ids) for c in outs))], dtype=torch.float64, device=device)
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    eng.release()
    destroy_parallel()
    floor_s = decode_bytes(weight_bytes, kv_per_token, prompts, plen, new) / bw
    result = {"bench": "rollout-tp", "label": args.label, "model": args.model, "device": str(device),
              "dtype": str(rt.dtype), "tp": rt.tp_size, "setting": f"{prompts}x{plen}->{new}",
              "new_tokens": n_new, "seconds": dt, "warmup_s": warm_s, "tokens_per_s": n_new / dt,
              "roofline_fraction": floor_s / dt, "weight_bytes_per_rank": weight_bytes,
              "kv_bytes_per_token_per_rank": kv_per_token, "copy_bandwidth_Bps": bw,
              "decode_steps": stats.get("decode"), "decode_s": stats.get("decode_s"),
              "prefill_s": stats.get("prefill_s"), "ranks_agree": bool(lo.item() == hi.item()),
              "all_tokens": n_new == prompts * new,
              # megatron's CUDA calls redirected to the CPU: must be false on GPU ranks
              "cpu_mode": cpu_mode_enabled()}
    if rt.rank == 0:
        print(f"rollout-tp --model {args.model}: TP {rt.tp_size}, {prompts}x{plen}->{new}, "
              f"{rt.dtype}, {device}: {n_new / dt:,.0f} tok/s in {dt:.2f} s (warm-up {warm_s:.1f} s), "
              f"roofline {floor_s / dt:.1%} (shard {weight_bytes / 1e9:.2f} GB, copy "
              f"{bw / 1e12:.2f} TB/s), ranks agree: {result['ranks_agree']}")
        print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))
    return 0 if result["ranks_agree"] and result["all_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
