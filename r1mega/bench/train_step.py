"""`r1mega bench train-step`: one training step of r1mega's model vs Hugging Face transformers.

``--model`` picks the shape from r1mega/bench/shapes.py:

  852m             (default; issue 2) 16 layers, hidden 2048, 16 heads, 4 KV groups, FFN 5632,
                   vocab 32000 (852M parameters, untied), 8 x 2048 tokens per step. Peer:
                   transformers LlamaForCausalLM. Bar: >= 1.25x its tokens/s, no higher peak memory.
  qwen3-moe-small  (issue 16) Qwen3-MoE layout: 12 layers, hidden 2048, 32 heads of 128, 4 KV
                   heads, 64 experts top-8 of width 768, vocab 32000, 4 x 2048 tokens per step.
                   Peer: transformers Qwen3MoeForCausalLM, with its default experts
                   implementation and each one named in --hf-experts. Bar: >= 2.0x its tokens/s,
                   no higher peak memory.

Both run in this process, one after the other, on the same token ids, bf16 on CUDA:

  r1mega   megatron-core GPTModel from r1mega's spec (packed THD batch, SDPA core attention; the
           MoE layers of r1mega/moe: float32 router, device-side routing metadata, grouped-GEMM
           experts), megatron DDP + distributed optimizer (fp32 master weights), r1mega's
           TrainStep and an SFT cross-entropy ("fp32": float32 log-softmax of the logits, or
           "chunked": r1mega.ops vocab-parallel log-probs, which never builds float32 (T, V) logits)
  hf       transformers, attn_implementation="sdpa", torch AdamW(fused=True) on the bf16 weights

Reported: ms/step, tokens/s, model TFLOP/s, MFU against a bf16 matmul rate measured in this run
(8192^3), peak memory, and the ratio to HF. The FLOPs per token are 6 N + causal attention
6 L s (heads x head_dim); for an MoE shape N counts the *active* parameters (router, the k chosen
experts, attention, embeddings), so the MFU is the active-parameter MFU. The static memory per
parameter differs by recipe: r1mega keeps fp32 master weights and Adam moments (16-18 bytes per
parameter plus the bf16 weight), transformers' bf16 AdamW keeps everything bf16 (8 bytes); the
JSON line reports both so a memory comparison can be read against it.

``--smoke`` runs the shape's tiny variant on CPU (fp32) to check the script end to end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from r1mega.bench.flops import matmul_peak_flops, model_flops_per_token
from r1mega.bench.hf_peer import PeerUnavailable, build_hf_model, is_moe_shape, total_parameters
from r1mega.bench.shapes import SHAPES, get_shape
from r1mega.bench.step_profile import (GcClock, OptimizerClock, print_step_profile,
                                       print_steps_profile, StepClock)

# Sequences of --seq-len per step, and the speed bar against transformers, per --model.
DEFAULT_SEQS = {"qwen3-moe-small": 4}
SPEED_BAR = {"qwen3-moe-small": 2.0}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device) -> float:
    """Frees what earlier runs left and restarts the peak count; -> GB still allocated (a run
    that left its model behind would inflate every later run's peak by this much)."""
    from r1mega.train.roles import free_dropped_models

    free_dropped_models(device)
    if device.type != "cuda":
        return float("nan")
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 1e9


def _peak_gb(device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 1e9


_PROFILE = {"on": False, "rows": 25, "breakdowns": {}, "steps": 0}
_SPREAD: dict = {}  # _timed's label -> StepClock.summary() of its timed steps

def _timed(step_fn, device, warmup: int, steps: int, label: str = "",
           clock: OptimizerClock | None = None) -> tuple[float, list]:
    losses = []
    for _ in range(warmup):
        losses.append(step_fn())
    _sync(device)
    if clock is not None:
        clock.reset()  # the timed steps only
    spread = StepClock(device)
    gc_clock = GcClock()
    t = time.perf_counter()
    spread.mark(t)
    with gc_clock:
        for _ in range(steps):
            losses.append(step_fn())
            spread.mark(time.perf_counter())
            gc_clock.mark()
    _sync(device)
    sec = (time.perf_counter() - t) / steps
    if clock is not None:
        clock.result_ms = clock.mean_ms()
    per_step = dict(spread.summary(), gc_ms=gc_clock.per_step_ms, gc_full=gc_clock.full_per_step,
                    optimizer_ms=clock.per_step_ms() if clock is not None else [])
    _SPREAD[label] = per_step
    if per_step["device_ms"]:
        ms = {k: " ".join(f"{x:.1f}" for x in per_step[k])
              for k in ("device_ms", "optimizer_ms", "host_ms", "gc_ms")}
        print(f"---- steps: {label}: device ms per step {ms['device_ms']}; of it the optimizer "
              f"{ms['optimizer_ms']}; host ms per step {ms['host_ms']}; host ms in Python's gc per "
              f"step {ms['gc_ms']}; full collections {sum(per_step['gc_full'])}")
    if _PROFILE["on"] and device.type == "cuda":
        kinds = print_step_profile(step_fn, label, _PROFILE["rows"])
        if kinds is not None:
            _PROFILE["breakdowns"][label] = kinds
    if _PROFILE["steps"] and device.type == "cuda":
        print_steps_profile(step_fn, label, _PROFILE["steps"])
    return sec, losses


def run_r1mega(shape, tokens, rt, loss_impl: str, warmup: int, steps: int, compile_mode: str,
               thd: bool = False, attention: str = "auto", grad_reduce_in_fp32: bool = True,
               precision=None, exact: bool = False, master_weights: str = "fp32",
               moments_dtype: str = "fp32"):
    from r1mega.config import ModelConfig, OptimizerConfig, PrecisionConfig
    from r1mega.models import spec as spec_mod
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    if compile_mode == "norm":
        spec_mod.RMSNorm.forward = torch.compile(spec_mod.RMSNorm.forward, dynamic=True)
    model_cfg = ModelConfig(**shape, attention_backend=attention)
    precision = precision or PrecisionConfig(grad_reduce_in_fp32=grad_reduce_in_fp32)
    # The lean optimizer state (r1mega/train/lean_adam.py) runs without the distributed
    # optimizer; a lean master needs bf16 weights (CPU smoke runs are fp32 otherwise).
    lean = master_weights != "fp32" or moments_dtype != "fp32"
    if master_weights != "fp32" and rt.dtype != torch.bfloat16:
        rt = dataclasses.replace(rt, dtype=torch.bfloat16)
    distributed = not lean
    chunks = build_model(model_cfg, rt, precision, wrap=True, distributed_optimizer=distributed)
    if exact:  # rollout.exact's training forward: batch-invariant ops (r1mega/ops/batch_invariant.py)
        from r1mega.ops.batch_invariant import install_exact_forward

        install_exact_forward(chunks)
    if compile_mode == "layer":
        # Each TransformerLayer as one compiled region (r1mega.models.compile removes megatron's
        # graph breaks); the first steps (warmup) pay the compile time.
        from r1mega.models.compile import compile_layers

        compile_layers(chunks, dynamic=False)
    optim = build_optimizer(OptimizerConfig(lr=1e-5, clip_grad=1.0, master_weights=master_weights,
                                            moments_dtype=moments_dtype),
                            chunks, rt, distributed=distributed)
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

    clock = OptimizerClock(rt.device)
    step.optimizer_step = clock.wrap(step.optimizer_step)

    def one():
        # The StepResult itself: reading .loss here would wait for the step every time (the
        # sync-free step reads its results back only when asked); read after the timing.
        return step(samples, loss_fn)

    sec, losses = _timed(one, rt.device, warmup, steps,
                         f"r1mega[{loss_impl}] compile={compile_mode} attention={attention} "
                         f"grad_reduce_in_fp32={grad_reduce_in_fp32}", clock)
    peak = _peak_gb(rt.device)
    losses = [r.loss for r in losses]
    del step, optim, chunks
    return sec, peak, losses, clock.result_ms


def run_hf(shape, tokens, device, dtype, warmup: int, steps: int, experts: str | None = None):
    model, experts_impl = build_hf_model(shape, device, dtype, experts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    clock = OptimizerClock(device)

    @clock.wrap
    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def one():
        out = model(input_ids=tokens, labels=tokens)
        out.loss.backward()
        update()
        return out.loss.detach()

    sec, losses = _timed(one, device, warmup, steps, f"transformers experts={experts_impl}", clock)
    peak = _peak_gb(device)
    n_params = total_parameters(model)
    del model, opt
    return (sec, peak, [float(x) for x in losses], experts_impl, n_params,
            clock.result_ms)


def _no_nan(x):
    """JSON has no NaN: unmeasured numbers (CPU memory) become null."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return x


def lean_bytes_per_param(master_weights: str, moments_dtype: str) -> int:
    """Weights + gradient buffer + master + moments per parameter of a lean-optimizer row: a
    lean master steps from a bf16 grad buffer; an fp32 master keeps the fp32 buffer."""
    master = {"fp32": 4 + 4, "bf16_remainder": 2 + 2, "bf16_stochastic": 2}[master_weights]
    return 2 + master + (8 if moments_dtype == "fp32" else 4)


def _static_gb(n_params: int, bytes_per_param: int) -> float:
    return n_params * bytes_per_param / 1e9


def add_optimizer_state_args(ap, *, master_help: str = None, moments_help: str = None,
                             master: str = "fp32", moments: str = "fp32") -> None:
    """``--master-weights`` / ``--moments-dtype``: the choices of optimizer.master_weights and
    optimizer.moments_dtype (r1mega/train/lean_adam_math.py), for every bench that offers them."""
    from r1mega.train.lean_adam_math import MASTER_MODES, MOMENT_DTYPES

    ap.add_argument("--master-weights", default=master, choices=list(MASTER_MODES), help=master_help)
    ap.add_argument("--moments-dtype", default=moments, choices=list(MOMENT_DTYPES), help=moments_help)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench train-step", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="852m", choices=sorted(SHAPES),
                    help="the shape (r1mega/bench/shapes.py); the peer is transformers' model of it")
    ap.add_argument("--seqs", type=int, default=None,
                    help="sequences per step (default: 8; 4 for qwen3-moe-small)")
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
    ap.add_argument("--hf-experts", default="default,grouped_mm",
                    help="MoE shapes: comma-separated experts_implementation values of the "
                         "transformers peer, each timed ('default': transformers' own choice; "
                         "a value equal to the resolved default is not timed twice; e.g. eager)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, print the top device kernels of one step of each run")
    ap.add_argument("--profile-steps", type=int, default=0, metavar="N",
                    help="after timing, profile N consecutive steps of each run and compare the "
                         "slowest with the fastest")
    ap.add_argument("--compile-too", action="store_true",
                    help="also time r1mega with --compile layer in the same run")
    ap.add_argument("--fp8", default=None, choices=["tensorwise", "rowwise", "blockwise"],
                    help="also time r1mega with native FP8 linears (precision.fp8_recipe); "
                         "--smoke emulates FP8 on the CPU")
    ap.add_argument("--fp8-experts", action="store_true",
                    help="with --fp8 on an MoE model: the experts in FP8 too (precision.fp8_experts)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU, end-to-end check")
    add_optimizer_state_args(
        ap, master_help="also time a row with this optimizer.master_weights (lean optimizer state)",
        moments_help="the Adam moments' dtype of that row (optimizer.moments_dtype)")
    ap.add_argument("--exact", action="store_true",
                    help="also time the rollout.exact training forward (a fresh model), same run")
    args = ap.parse_args(argv)
    if args.fp8_experts and not args.fp8:
        ap.error("--fp8-experts needs --fp8 RECIPE")
    _PROFILE["on"] = args.profile
    _PROFILE["steps"] = max(0, args.profile_steps)

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    shape = get_shape(args.model, smoke=args.smoke)
    if args.exact:  # the exact forward runs r1mega's local layers: the default row on them too
        shape["spec"] = "local"
    moe = is_moe_shape(shape)
    if args.seqs is None:
        args.seqs = DEFAULT_SEQS.get(args.model, 8)
    if args.smoke:
        args.seqs, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
    hf_experts = [e.strip() for e in args.hf_experts.split(",") if e.strip()] if moe else ["default"]
    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=read_launch_env())
    device, dtype = rt.device, rt.dtype
    if rt.world_size != 1:
        raise SystemExit("bench train-step runs on one process (no torchrun); for several ranks "
                         "use `r1mega bench train-scale` (DP x TP x PP x EP, under torchrun).")
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
    rows = {}  # name -> (sec, peak GB, losses)
    extra = {}  # name -> extra JSON fields

    def add_r1mega(name, run, base, **more):
        sec, mem, losses, opt_ms = run
        rows[name] = (sec, mem, losses)
        extra[name] = {"allocated_before_gb": base, "optimizer_ms": opt_ms, **more}

    for impl in impls:
        base = _reset_memory(device)
        add_r1mega(f"r1mega[{impl}]", run_r1mega(shape, tokens, rt, impl, args.warmup, args.steps,
                                                 args.compile, attention=args.attention), base)
    if args.compile_too and args.compile != "layer":
        base = _reset_memory(device)
        add_r1mega(f"r1mega[{impls[-1]},compiled]",
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, "layer",
                              attention=args.attention), base)
    if args.bf16_grads_too:
        # With one micro-batch on one rank the buffer only receives the bf16 weight gradient once,
        # so fp32 and bf16 buffers hold the same values.
        base = _reset_memory(device)
        add_r1mega(f"r1mega[{impls[-1]},bf16-grads]",
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, args.compile,
                              attention=args.attention, grad_reduce_in_fp32=False), base,
                   bytes_per_param_static=16)
    if args.thd_too:
        base = _reset_memory(device)
        add_r1mega(f"r1mega[{impls[-1]},thd]",
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, args.compile,
                              thd=True, attention=args.attention), base)
    if args.fp8:
        base = _reset_memory(device)
        fp8_name = f"r1mega[{impls[-1]},fp8-{args.fp8}{'+experts' if args.fp8_experts else ''}]"
        fp8_prec = PrecisionConfig(fp8=True, fp8_backend="native", fp8_recipe=args.fp8,
                                   fp8_emulate=device.type != "cuda",
                                   fp8_experts=args.fp8_experts)
        add_r1mega(fp8_name,
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, args.compile,
                              attention=args.attention, precision=fp8_prec), base)
    lean_name = None
    if args.master_weights != "fp32" or args.moments_dtype != "fp32":
        lean_name = f"r1mega[{impls[-1]},{args.master_weights},m{args.moments_dtype}]"
        base = _reset_memory(device)
        add_r1mega(lean_name,
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, args.compile,
                              attention=args.attention,
                              grad_reduce_in_fp32=args.master_weights == "fp32",
                              master_weights=args.master_weights,
                              moments_dtype=args.moments_dtype), base,
                   bytes_per_param_static=lean_bytes_per_param(args.master_weights,
                                                               args.moments_dtype))
    if args.exact:
        base = _reset_memory(device)
        add_r1mega(f"r1mega[{impls[-1]},exact]",
                   run_r1mega(shape, tokens, rt, impls[-1], args.warmup, args.steps, "none",
                              attention=args.attention, exact=True), base)
    hf_names, skipped = [], {}
    if not args.skip_hf:
        seen = set()
        for want in hf_experts:
            if want in seen:
                continue
            base = _reset_memory(device)
            try:
                sec, mem, losses, resolved, n_hf, opt_ms = run_hf(shape, tokens, device, dtype,
                                                                  args.warmup, args.steps, want)
            except PeerUnavailable as exc:
                print(f"transformers[{want}]: not timed: {exc}")
                skipped[want] = str(exc)
                continue
            seen.update({want, resolved})
            if not moe:
                name = "transformers"
            elif want == "default":
                name = f"transformers[default={resolved}]"
            else:
                name = f"transformers[{resolved}]"
            rows[name] = (sec, mem, losses)
            extra[name] = {"experts_implementation": resolved, "requested": want,
                           "bytes_per_param_static": 8, "total_parameters": n_hf,
                           "allocated_before_gb": base, "optimizer_ms": opt_ms}
            hf_names.append(name)
    destroy_parallel()

    n_total = None
    if moe:
        from r1mega.config import ModelConfig
        from r1mega.models.gpt import count_parameters

        n_active = count_parameters(ModelConfig(**shape))
        n_total = count_parameters(ModelConfig(**dict(shape, moe_router_topk=shape["num_experts"])))
    # The peer to beat: transformers' fastest run.
    hf = min((rows[n] for n in hf_names), key=lambda r: r[0]) if hf_names else None
    result = {"model": args.model, "shape": shape, "tokens_per_step": n_tokens,
              "device": str(device), "dtype": str(dtype), "matmul_peak_tflops": peak / 1e12,
              "flops_per_token": flops_tok, "compile": args.compile, "impls": {}}
    if moe:
        from r1mega.moe import _cuda_ext
        from r1mega.moe.experts import grouped_mm_available

        probe = torch.empty(0, device=device, dtype=dtype)
        ext_error = None if device.type != "cuda" or _cuda_ext.get() is not None else _cuda_ext.load_error()
        # What the r1mega rows ran: a fallback here explains a slow row.
        result.update(active_parameters=n_active, total_parameters=n_total,
                      r1mega_experts="grouped_mm" if grouped_mm_available(probe) else "loop",
                      r1mega_dispatch="cuda" if device.type == "cuda" and ext_error is None
                      else "torch" + (f" ({ext_error})" if ext_error else ""))
    if skipped:
        result["hf_not_timed"] = skipped
    print(f"train-step --model {args.model}: {shape['num_layers']} layers, hidden "
          f"{shape['hidden_size']}, vocab {shape['vocab_size']}, {args.seqs}x{args.seq_len} tokens, "
          f"{dtype}, {device}; measured matmul peak {peak / 1e12:.1f} TFLOP/s")
    if moe:
        print(f"MoE: {shape['num_experts']} experts top-{shape['moe_router_topk']}, "
              f"{n_active / 1e9:.3f}B active / {n_total / 1e9:.3f}B total parameters; MFU is "
              f"active-parameter MFU; r1mega ran experts {result['r1mega_experts']}, "
              f"dispatch {result['r1mega_dispatch']}")
        # Weights + gradients + optimizer state before any activation: the floor of each peak.
        print(f"static memory: r1mega {_static_gb(n_total, 18):.1f} GB (18 B/param: bf16 weights, "
              f"fp32 gradient buffer, fp32 masters and Adam moments); transformers "
              f"{_static_gb(n_total, 8):.1f} GB (8 B/param: bf16 weights, gradients, AdamW moments)")
    head = f"{'impl':<40}{'ms/step':>10}{'optim ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}" \
           f"{'peak GB':>10}{'vs HF':>8}{'loss[0]':>10}"
    print(head)
    print("-" * len(head))
    for name, (sec, mem, losses) in rows.items():
        tps = n_tokens / sec
        tflops = tps * flops_tok / 1e12
        ratio = (hf[0] / sec) if hf else float("nan")
        opt_ms = extra.get(name, {}).get("optimizer_ms", float("nan"))
        print(f"{name:<40}{sec * 1e3:>10.1f}{opt_ms:>10.1f}{tps:>12.0f}{tflops:>10.1f}"
              f"{tflops * 1e12 / peak:>8.1%}{mem:>10.2f}{ratio:>8.2f}{float(losses[0]):>10.4f}")
        row = {"ms_per_step": sec * 1e3, "tokens_per_s": tps, "model_tflops": tflops,
               "mfu": tflops * 1e12 / peak, "peak_memory_gb": mem, "speedup_vs_hf": ratio,
               "first_loss": float(losses[0]), "last_loss": float(losses[-1])}
        if name.startswith("r1mega"):
            # bf16 weight + fp32 gradient buffer + fp32 master + two fp32 Adam moments
            # (lean rows override it from their extra fields).
            row["bytes_per_param_static"] = 18
        row.update(extra.get(name, {}))
        if n_total and "bytes_per_param_static" in row:
            row["static_memory_gb_estimate"] = _static_gb(n_total, row["bytes_per_param_static"])
        result["impls"][name] = row
    if args.fp8:
        # FP8's step speed-up over the bf16 row of the same loss implementation, same run.
        result["fp8_speedup"] = rows[f"r1mega[{impls[-1]}]"][0] / rows[fp8_name][0]
    if args.exact:  # against the default forward of the same loss in this run (bar: >= 0.8)
        result["exact_vs_default"] = rows[f"r1mega[{impls[-1]}]"][0] / rows[f"r1mega[{impls[-1]},exact]"][0]
    # The bar against transformers is the default bf16 path's: FP8 and exact rows do not count.
    best = min((k for k in rows if k not in hf_names and ",fp8-" not in k and ",exact]" not in k),
               key=lambda k: rows[k][0])
    if hf:
        bar = SPEED_BAR.get(args.model, 1.25)
        result["best"] = best
        result["hf_best"] = min(hf_names, key=lambda n: rows[n][0])
        result["speedup_vs_hf"] = hf[0] / rows[best][0]
        result["memory_vs_hf"] = rows[best][1] / hf[1] if hf[1] == hf[1] else None
        result["speed_bar"] = bar
        result["bar_met"] = bool(result["speedup_vs_hf"] >= bar and
                                 (hf[1] != hf[1] or rows[best][1] <= hf[1]))
    if any(v["device_ms"] for v in _SPREAD.values()):
        result["device_ms_per_step"] = {k: [round(x, 2) for x in v["device_ms"]]
                                        for k, v in _SPREAD.items()}
        result["gc_ms_per_step"] = {k: [round(x, 2) for x in v["gc_ms"]] for k, v in _SPREAD.items()}
    if _PROFILE["breakdowns"]:
        result["profile_device_ms_by_kind"] = _PROFILE["breakdowns"]
    print(json.dumps(_no_nan(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
