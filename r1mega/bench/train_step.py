"""`r1mega bench train-step`: one training step of r1mega's model vs Hugging Face transformers.

Shape (issue 2): 16 layers, hidden 2048, 16 heads, 4 KV groups, FFN 5632, vocab 32000 (852M
parameters, untied), 8 sequences x 2048 tokens per step, bf16, Adam. Both run in this process,
one after the other, on the same token ids:

  r1mega   megatron-core GPTModel from r1mega's spec (packed THD batch, SDPA core attention),
           megatron DDP + distributed optimizer (fp32 master weights), r1mega's TrainStep and an
           SFT cross-entropy ("fp32": float32 log-softmax of the logits, or "chunked": r1mega.ops
           vocab-parallel log-probs, which never builds float32 (T, V) logits)
  hf       transformers LlamaForCausalLM, attn_implementation="sdpa", torch AdamW(fused=True)

Reported: ms/step, tokens/s, model TFLOP/s (6 N per token + causal attention 6 L h s), MFU
against a bf16 matmul rate measured in this run (8192^3), peak memory, and the ratio to HF.
The bar on the H200: r1mega >= 1.25x transformers' tokens/s with no higher peak memory.

``--smoke`` runs a tiny shape on CPU (fp32) to check the script end to end.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

SHAPE = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
             ffn_hidden_size=5632, vocab_size=32000, tied_embeddings=False,
             max_position_embeddings=4096, make_vocab_size_divisible_by=128)
SMOKE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=128, vocab_size=256, tied_embeddings=False,
             max_position_embeddings=256, make_vocab_size_divisible_by=128)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device, dtype, n: int) -> float:
    """Measured FLOP/s of an n^3 matmul in ``dtype`` (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def model_flops_per_token(shape: dict, seq_len: int) -> float:
    """6 N (all parameters, embeddings included) + causal attention 6 L h s (half of 12 L h s)."""
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import count_parameters

    n = count_parameters(ModelConfig(**shape))
    return 6 * n + 6 * shape["num_layers"] * shape["hidden_size"] * seq_len


def _reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 1e9


_PROFILE = {"on": False, "rows": 25}


def _profile_step(step_fn, label: str) -> None:
    """Top device kernels of one step (``--profile``): where the milliseconds go."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        torch.cuda.synchronize()
    print(f"---- profile: {label} (one step)")
    avg = prof.key_averages()
    print(avg.table(sort_by="cuda_time_total", row_limit=_PROFILE["rows"], max_name_column_width=60))
    # Host side: a step whose device time is below its wall time is waiting on these.
    print(f"---- profile: {label}, top host (self CPU) ops")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def _timed(step_fn, device, warmup: int, steps: int, label: str = "") -> tuple[float, list]:
    losses = []
    for _ in range(warmup):
        losses.append(step_fn())
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        losses.append(step_fn())
    _sync(device)
    sec = (time.perf_counter() - t) / steps
    if _PROFILE["on"] and device.type == "cuda":
        _profile_step(step_fn, label)
    return sec, losses


def run_r1mega(shape, tokens, rt, loss_impl: str, warmup: int, steps: int, compile_mode: str,
               thd: bool = False, attention: str = "auto", grad_reduce_in_fp32: bool = True,
               exact: bool = False):
    from r1mega.config import ModelConfig, OptimizerConfig, PrecisionConfig
    from r1mega.models import spec as spec_mod
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    if compile_mode == "norm":
        spec_mod.RMSNorm.forward = torch.compile(spec_mod.RMSNorm.forward, dynamic=True)
    model_cfg = ModelConfig(**shape, attention_backend=attention)
    precision = PrecisionConfig(grad_reduce_in_fp32=grad_reduce_in_fp32)
    chunks = build_model(model_cfg, rt, precision, wrap=True, distributed_optimizer=True)
    if exact:  # rollout.exact's training forward: batch-invariant ops (r1mega/ops/batch_invariant.py)
        from r1mega.ops.batch_invariant import install_exact_forward

        install_exact_forward(chunks)
    if compile_mode == "layer":
        # Each TransformerLayer as one compiled region (r1mega.models.compile removes megatron's
        # graph breaks); the first steps (warmup) pay the compile time.
        from r1mega.models.compile import compile_layers

        compile_layers(chunks, dynamic=False)
    optim = build_optimizer(OptimizerConfig(lr=1e-5, clip_grad=1.0), chunks, rt, distributed=True)
    b, s = tokens.shape
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=b * s, batch_equal_lengths=not thd)
    samples = [sft_sample(tokens[i].cpu()) for i in range(b)]
    if loss_impl == "chunked":
        from r1mega.ops.logprobs import vocab_parallel_logprobs

        # The ids are validated here, on the host, once (as `r1mega sft` checks its batches on the
        # host), so the loss skips the per-micro-batch device range check (a sync).
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= model_cfg.vocab_size:
            raise ValueError(f"token ids [{lo}, {hi}] outside the vocabulary {model_cfg.vocab_size}")

        def loss_fn(logits, mb):
            mask = mb.fields["loss_mask"]
            logp, _ = vocab_parallel_logprobs(logits, mb.fields["labels"], tp_group=rt.tp_group,
                                              vocab_size=model_cfg.vocab_size,
                                              inplace_backward=True, check_range=False)
            nll = -(logp * mask).sum()
            return nll, mask.sum().to(torch.int32), {}
    else:
        loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group)

    def one():
        # The StepResult itself: reading .loss here would wait for the step every time (the
        # sync-free step reads its results back only when asked); read after the timing.
        return step(samples, loss_fn)

    sec, losses = _timed(one, rt.device, warmup, steps,
                         f"r1mega[{loss_impl}] compile={compile_mode} attention={attention} "
                         f"grad_reduce_in_fp32={grad_reduce_in_fp32}")
    peak = _peak_gb(rt.device)
    losses = [r.loss for r in losses]
    del step, optim, chunks
    return sec, peak, losses


def run_hf(shape, tokens, device, dtype, warmup: int, steps: int):
    import transformers

    conf = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=shape["tied_embeddings"], attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(conf).to(device=device, dtype=dtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def one():
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    sec, losses = _timed(one, device, warmup, steps, "transformers")
    peak = _peak_gb(device)
    del model, opt
    return sec, peak, [float(x) for x in losses]


def _no_nan(x):
    """JSON has no NaN: unmeasured numbers (CPU memory) become null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench train-step", description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss", default="auto", choices=["auto", "fp32", "chunked", "both"],
                    help="r1mega's SFT loss: auto = chunked when r1mega.ops imports, else fp32")
    ap.add_argument("--compile", default="none", choices=["none", "norm", "layer"],
                    help="torch.compile RMSNorm.forward or every TransformerLayer.forward")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "varlen", "flash"],
                    help="model.attention_backend of the r1mega runs")
    ap.add_argument("--bf16-grads-too", action="store_true",
                    help="also time r1mega with precision.grad_reduce_in_fp32=false (bf16 gradient "
                         "buffers; fp32 master weights and Adam states either way)")
    ap.add_argument("--thd-too", action="store_true",
                    help="also time r1mega with the batch packed as THD (as RL batches are)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, print the top device kernels of one step of each run")
    ap.add_argument("--compile-too", action="store_true",
                    help="also time r1mega with --compile layer in the same run")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, end-to-end check")
    ap.add_argument("--exact", action="store_true",
                    help="also time the rollout.exact training forward (a fresh model), same run")
    args = ap.parse_args(argv)
    _PROFILE["on"] = args.profile

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    shape = dict(SMOKE if args.smoke else SHAPE)
    if args.smoke:
        args.seqs, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=read_launch_env())
    device, dtype = rt.device, rt.dtype
    if rt.world_size != 1:
        raise SystemExit("bench train-step runs on one process (no torchrun).")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (args.seqs, args.seq_len), generator=g).to(device)
    n_tokens = args.seqs * args.seq_len
    flops_tok = model_flops_per_token(shape, args.seq_len)
    peak = matmul_peak_flops(device, dtype, 8192 if device.type == "cuda" else 512)

    impls = {"both": ["fp32", "chunked"], "auto": None}.get(args.loss, [args.loss])
    if impls is None:
        try:
            import r1mega.ops.logprobs  # noqa: F401
            impls = ["chunked"]
        except Exception:
            impls = ["fp32"]
    rows = {}
    for impl in impls:
        _reset_memory(device)
        sec, mem, losses = run_r1mega(shape, tokens, rt, impl, args.warmup, args.steps,
                                      args.compile, attention=args.attention)
        rows[f"r1mega[{impl}]"] = (sec, mem, losses)
    if args.compile_too and args.compile != "layer":
        _reset_memory(device)
        rows[f"r1mega[{impls[-1]},compiled]"] = run_r1mega(shape, tokens, rt, impls[-1], args.warmup,
                                                           args.steps, "layer", attention=args.attention)
    if args.bf16_grads_too:
        # With one micro-batch on one rank the buffer only receives the bf16 weight gradient once,
        # so fp32 and bf16 buffers hold the same values (H200: 185.0 vs 183.5 ms, 33.3 vs 35.0 GB).
        _reset_memory(device)
        rows[f"r1mega[{impls[-1]},bf16-grads]"] = run_r1mega(
            shape, tokens, rt, impls[-1], args.warmup, args.steps, args.compile,
            attention=args.attention, grad_reduce_in_fp32=False)
    if args.thd_too:
        _reset_memory(device)
        rows[f"r1mega[{impls[-1]},thd]"] = run_r1mega(shape, tokens, rt, impls[-1], args.warmup,
                                                      args.steps, args.compile, thd=True,
                                                      attention=args.attention)
    if args.exact:
        _reset_memory(device)
        rows[f"r1mega[{impls[-1]},exact]"] = run_r1mega(
            shape, tokens, rt, impls[-1], args.warmup, args.steps, "none",
            attention=args.attention, exact=True)
    if not args.skip_hf:
        _reset_memory(device)
        rows["transformers"] = run_hf(shape, tokens, device, dtype, args.warmup, args.steps)
    destroy_parallel()

    hf = rows.get("transformers")
    print(f"train-step: {shape['num_layers']} layers, hidden {shape['hidden_size']}, vocab "
          f"{shape['vocab_size']}, {args.seqs}x{args.seq_len} tokens, {dtype}, {device}; "
          f"measured matmul peak {peak / 1e12:.1f} TFLOP/s")
    head = f"{'impl':<34}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GB':>10}" \
           f"{'vs HF':>8}{'loss[0]':>10}"
    print(head)
    print("-" * len(head))
    result = {"shape": shape, "tokens_per_step": n_tokens, "device": str(device),
              "dtype": str(dtype), "matmul_peak_tflops": peak / 1e12, "compile": args.compile,
              "impls": {}}
    for name, (sec, mem, losses) in rows.items():
        tps = n_tokens / sec
        tflops = tps * flops_tok / 1e12
        ratio = (hf[0] / sec) if hf else float("nan")
        print(f"{name:<34}{sec * 1e3:>10.1f}{tps:>12.0f}{tflops:>10.1f}{tflops * 1e12 / peak:>8.1%}"
              f"{mem:>10.2f}{ratio:>8.2f}{float(losses[0]):>10.4f}")
        result["impls"][name] = {"ms_per_step": sec * 1e3, "tokens_per_s": tps,
                                 "model_tflops": tflops, "mfu": tflops * 1e12 / peak,
                                 "peak_memory_gb": mem, "speedup_vs_hf": ratio,
                                 "first_loss": float(losses[0]), "last_loss": float(losses[-1])}
    if args.exact:  # against the default forward of the same loss in this run (bar: >= 0.8)
        base = rows[f"r1mega[{impls[-1]}]"][0]
        result["exact_vs_default"] = base / rows[f"r1mega[{impls[-1]},exact]"][0]
    best = max((k for k in rows if k != "transformers" and not k.endswith(",exact]")),
               key=lambda k: -rows[k][0])
    if hf:
        result["best"] = best
        result["speedup_vs_hf"] = hf[0] / rows[best][0]
        result["memory_vs_hf"] = rows[best][1] / hf[1] if hf[1] == hf[1] else None
        result["bar_met"] = bool(result["speedup_vs_hf"] >= 1.25 and
                                 (hf[1] != hf[1] or rows[best][1] <= hf[1]))
    print(json.dumps(_no_nan(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
