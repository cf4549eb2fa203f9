"""`r1mega bench train-scale`: one training step on several ranks (torchrun), DP x TP x PP x EP.

    torchrun --nproc-per-node 8 -m r1mega.cli bench train-scale --model 852m
    torchrun --nproc-per-node 8 -m r1mega.cli bench train-scale --model llama3-8b --tensor 8
    torchrun --nproc-per-node 4 -m r1mega.cli bench train-scale --model qwen3-moe-small --expert 4

``r1mega bench train-step`` is the one-process comparison with transformers; this is its
multi-rank twin for the scaling figures of the multi-GPU issue. Every data-parallel rank trains
``--seqs`` sequences of ``--seq-len`` tokens (the per-GPU batch stays fixed as DP grows: weak
scaling); the TP/PP ranks of one DP rank share them. The model is r1mega's megatron GPTModel with
megatron DDP (gradient reduce-scatter overlapped with the backward unless --no-overlap) and the
distributed optimizer (fp32 master weights and Adam moments sharded over DP), the SFT
cross-entropy of r1mega.train.step, bf16 on CUDA.

Reported (rank 0 prints; the last line is one JSON object): world size and layout, ms/step,
tokens/s in all and per GPU, model TFLOP/s and MFU per GPU (6 N + causal attention FLOPs per
token, as train-step; N the active parameters for an MoE shape, against a bf16 matmul rate
measured on rank 0), peak memory (largest over ranks), the all-to-all time per step of the MoE
token exchange (CUDA events around r1mega.moe.token_dispatcher.exchange_rows, slowest rank), and
with ``--ref-tokens-per-gpu X`` (per-GPU tokens/s of the DP=1 run of the same call) the per-GPU
efficiency against it.

``--smoke`` runs the shape's tiny variant (CPU: gloo, fp32) to check the script end to end.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from r1mega.bench.shapes import SHAPES, get_shape


class ExchangeClock:
    """Time spent in the MoE all-to-all (both directions, forward and backward) while on.

    CUDA events on the current stream around each exchange (no sync inside the step); on CPU the
    wall time. The clock wraps the module-level function that _AllToAll calls."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pairs, self.cpu_s, self.calls, self.on = [], 0.0, 0, False
        from r1mega.moe import token_dispatcher

        self._mod, self._orig = token_dispatcher, token_dispatcher.exchange_rows

        def timed(*args, **kwargs):
            if not self.on:
                return self._orig(*args, **kwargs)
            self.calls += 1
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = self._orig(*args, **kwargs)
                b.record()
                self.pairs.append((a, b))
                return out
            t = time.perf_counter()
            out = self._orig(*args, **kwargs)
            self.cpu_s += time.perf_counter() - t
            return out

        token_dispatcher.exchange_rows = timed

    def total_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.pairs)
        return self.cpu_s * 1e3

    def restore(self) -> None:
        self._mod.exchange_rows = self._orig


def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench train-scale", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="852m", choices=sorted(SHAPES))
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--expert", type=int, default=1)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--seqs", type=int, default=8, help="sequences per data-parallel rank per step")
    ap.add_argument("--micro-seqs", type=int, default=None,
                    help="sequences per micro-batch (default: all; 1 under --pipeline > 1)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-overlap", action="store_true", help="reduce-scatter gradients after backward")
    ap.add_argument("--ref-tokens-per-gpu", type=float, default=None,
                    help="per-GPU tokens/s of the DP=1 run of the same call: efficiency against it")
    ap.add_argument("--label", default="", help="a name for this row in the JSON line")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, few steps (CPU check)")
    args = ap.parse_args(argv)

    from r1mega.bench.flops import matmul_peak_flops, model_flops_per_token
    from r1mega.config import ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model, count_parameters
    from r1mega.parallel.cpu_mode import cpu_mode_enabled
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    shape = get_shape(args.model, smoke=args.smoke)
    if args.smoke:
        args.seqs, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
    moe = bool(shape.get("num_experts"))
    if args.expert > 1 and not moe:
        raise SystemExit(f"--expert {args.expert}: --model {args.model} has no experts")
    par = ParallelConfig(tensor=args.tensor, pipeline=args.pipeline, expert=args.expert,
                         sequence_parallel=args.sequence_parallel)
    rt = init_parallel(par, PrecisionConfig(), env=read_launch_env())
    device = rt.device
    model_cfg = ModelConfig(**shape)
    chunks = build_model(model_cfg, rt, PrecisionConfig(), wrap=True, distributed_optimizer=True,
                         overlap_grad_reduce=not args.no_overlap)
    optim = build_optimizer(OptimizerConfig(lr=1e-5, clip_grad=1.0), chunks, rt, distributed=True)
    micro = args.micro_seqs or (1 if args.pipeline > 1 else args.seqs)
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=micro * args.seq_len)
    # Different tokens per DP rank, the same on the TP/PP ranks of one DP rank.
    g = torch.Generator().manual_seed(1000 + rt.dp_rank)
    tokens = torch.randint(0, shape["vocab_size"], (args.seqs, args.seq_len), generator=g)
    samples = [sft_sample(tokens[i]) for i in range(args.seqs)]
    loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group)
    clock = ExchangeClock(device) if moe else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses = [step(samples, loss_fn) for _ in range(args.warmup)]
    sync()
    dist.barrier()
    if clock:
        clock.on = True
    t = time.perf_counter()
    losses += [step(samples, loss_fn) for _ in range(args.steps)]
    sync()
    sec = (time.perf_counter() - t) / args.steps
    sec = _max_over_ranks(sec, device)  # the step ends when the slowest rank's does
    a2a_ms = _max_over_ranks(clock.total_ms() / args.steps, device) if clock else None
    a2a_calls = clock.calls // args.steps if clock else None
    if clock:
        clock.restore()
    peak_gb = _max_over_ranks(torch.cuda.max_memory_allocated(device) / 1e9
                              if device.type == "cuda" else float("nan"), device)
    loss_vals = [r.loss for r in losses]
    peak = matmul_peak_flops(device, rt.dtype, 8192 if device.type == "cuda" else 256)
    n_active = count_parameters(model_cfg)
    flops_tok = model_flops_per_token(shape, args.seq_len)
    world, dp = rt.world_size, rt.dp_size
    tokens_step = dp * args.seqs * args.seq_len
    tps = tokens_step / sec
    per_gpu = tps / world
    tflops_gpu = per_gpu * flops_tok / 1e12
    result = {"bench": "train-scale", "label": args.label, "model": args.model,
              "device": str(device), "dtype": str(rt.dtype), "world_size": world,
              "dp": dp, "tp": rt.tp_size, "pp": rt.pp_size, "ep": rt.ep_size,
              "seqs_per_dp_rank": args.seqs, "seq_len": args.seq_len, "micro_seqs": micro,
              "tokens_per_step": tokens_step, "ms_per_step": sec * 1e3, "tokens_per_s": tps,
              "tokens_per_s_per_gpu": per_gpu, "model_tflops_per_gpu": tflops_gpu,
              "mfu": tflops_gpu * 1e12 / peak, "matmul_peak_tflops": peak / 1e12,
              "active_parameters": n_active, "peak_memory_gb_max_rank": peak_gb,
              "first_loss": float(loss_vals[0]), "last_loss": float(loss_vals[-1]),
              "overlap_grad_reduce": not args.no_overlap,
              # megatron's CUDA calls redirected to the CPU: must be false on GPU ranks
              "cpu_mode": cpu_mode_enabled()}
    if moe:
        result.update(all_to_all_ms_per_step=a2a_ms, all_to_all_calls_per_step=a2a_calls,
                      all_to_all_fraction=a2a_ms / (sec * 1e3))
    if args.ref_tokens_per_gpu:
        result["ref_tokens_per_s_per_gpu"] = args.ref_tokens_per_gpu
        result["efficiency_vs_ref"] = per_gpu / args.ref_tokens_per_gpu
    ok = all(x == x and abs(x) != float("inf") for x in loss_vals)
    result["losses_finite"] = ok
    destroy_parallel()
    if rt.rank == 0:
        print(f"train-scale --model {args.model}: world {world} = DP {dp} x TP {rt.tp_size} x PP "
              f"{rt.pp_size} (EP {rt.ep_size}), {args.seqs}x{args.seq_len} tokens per DP rank, "
              f"{rt.dtype}, {device}")
        print(f"  {sec * 1e3:.1f} ms/step, {tps:,.0f} tokens/s = {per_gpu:,.0f} per GPU, "
              f"{tflops_gpu:.1f} TFLOP/s per GPU (MFU {result['mfu']:.1%} of {peak / 1e12:.0f}), "
              f"peak {peak_gb:.1f} GB, loss {loss_vals[0]:.4f} -> {loss_vals[-1]:.4f}")
        if moe:
            print(f"  all-to-all {a2a_ms:.2f} ms/step ({a2a_calls} exchanges, "
                  f"{result['all_to_all_fraction']:.1%} of the step)")
        if args.ref_tokens_per_gpu:
            print(f"  per-GPU efficiency vs the reference run: {result['efficiency_vs_ref']:.1%}")
        print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in result.items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
