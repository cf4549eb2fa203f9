"""`r1mega bench fp8`: native FP8 training vs bf16 in the same run: step throughput and loss parity.

Throughput (default): for each shape of ``--models`` (r1mega/bench/shapes.py; default the
foundation issue's 852m and the GEMM-heavier gemm-heavy), r1mega's train step (the same code as
``r1mega bench train-step``) in bf16 and with ``precision.fp8_recipe=RECIPE``, 8 x 2048 tokens,
reporting ms/step, tokens/s and the FP8/bf16 ratio. Bar (issue 17, H200): gemm-heavy FP8 >= 1.3x
bf16 with blockwise, >= 1.4x with tensorwise. The measured bf16 and FP8 matmul rates (8192^3)
give each row's fraction of the GEMM floor.

``--train-env R1MEGA_NAME=VALUE[,...]`` (repeatable) adds an FP8 row built and run with those
switches set, ``--fp8-again`` the default FP8 row once more: a switch timed against the default
in one process, with the row-to-row drift beside it.

``--parity``: the 852m shape trains ``--parity-steps`` (200) steps on a fixed synthetic corpus
(a random bigram chain over 4096 tokens, 4 successors each: entropy floor ln 4) in bf16 and in
FP8 from the same initial weights; the bar is |final FP8 loss / final bf16 loss - 1| <= 2 %
(final = mean of the last 10 steps).

``--rollout``: the 852m shape's rollout (256 x 128 -> 256 by default) with bf16 weights and
with FP8 weight copies (``precision.fp8_rollout``), and with FP8 weights plus the FP8 KV cache
(``rollout.kv_cache_dtype=fp8``: the decode's other large read), same requests, same run:
tokens/s, the ratios to bf16 (bar: >= 1.4x) and each one's log-prob mismatch against the (bf16)
training forward.

``--backend te`` (throughput, parity; Transformer Engine importable): TE's layer spec and its
``fp8_autocast`` with ``--recipe`` current, delayed, blockwise or mxfp8, beside r1mega's bf16 row
and a bf16 row on TE's spec (parity compares TE's FP8 with TE's bf16: one spec, one set of
initial weights).

``--smoke``: tiny shapes on the CPU with FP8 emulated, to check the script end to end.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Optional

import torch

# Per recipe; TE's "current" and "delayed" are tensorwise scalings (current: this tensor's amax,
# delayed: an amax history's), "mxfp8" needs Blackwell.
BARS = {"blockwise": 1.3, "tensorwise": 1.4, "rowwise": None, "current": 1.4, "delayed": 1.4,
        "mxfp8": None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fp8_matmul_flops(device, n: int = 8192) -> float:
    """Measured FLOP/s of an n^3 tensorwise ``torch._scaled_mm`` (the FP8 GEMM floor)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    f = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    for _ in range(3):
        f()
    _sync(device)
    t = time.perf_counter()
    for _ in range(20):
        f()
    _sync(device)
    return 2 * n ** 3 * 20 / (time.perf_counter() - t)


class BigramCorpus:
    """Fixed synthetic language: token t is followed by one of 4 fixed successors, uniformly."""

    def __init__(self, vocab: int, states: int = 4096, fanout: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.states = min(states, vocab)
        self.next = torch.randint(0, self.states, (self.states, fanout), generator=g)
        self.g = torch.Generator().manual_seed(seed + 1)

    def batch(self, seqs: int, seq_len: int) -> torch.Tensor:
        out = torch.empty(seqs, seq_len, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.states, (seqs,), generator=self.g)
        pick = torch.randint(0, self.next.shape[1], (seqs, seq_len), generator=self.g)
        for t in range(1, seq_len):
            out[:, t] = self.next[out[:, t - 1], pick[:, t]]
        return out


def train_losses(shape: dict, precision, batches: list, rt, init_state=None, lr: float = 3e-4):
    """Per-step losses of r1mega's train step on ``batches``; returns (losses, initial state)."""
    from r1mega.config import ModelConfig, OptimizerConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.sharding import gather_full, load_full_state, named_global_parameters
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    cfg = ModelConfig(**shape)
    chunks = build_model(cfg, rt, precision, wrap=True, distributed_optimizer=True)
    named = dict(named_global_parameters(chunks))
    if init_state is None:
        init_state = {k: v.cpu() for k, v in gather_full(
            {k: p.data for k, p in named.items()}, named, rt.tp_rank, rt.tp_size).items()}
    else:
        load_full_state(chunks, {k: v.to(rt.device) for k, v in init_state.items()},
                        rt.tp_rank, rt.tp_size, cfg.tied_embeddings)
    optim = build_optimizer(OptimizerConfig(lr=lr, warmup_steps=min(20, len(batches) // 4),
                                            clip_grad=1.0), chunks, rt, distributed=True,
                            total_steps=len(batches))
    b, s = batches[0].shape
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=b * s)
    loss_fn = sft_loss_fn(cfg.vocab_size, rt.tp_group)
    results = [step([sft_sample(t) for t in tokens.to(rt.device)], loss_fn) for tokens in batches]
    losses = [float(r.loss) for r in results]
    del step, optim, chunks
    return losses, init_state


def _precisions(recipe: str, device, fp32_grads: bool = True, backend: str = "native") -> dict:
    """row name -> (PrecisionConfig, model.spec). The bf16 baseline is r1mega's local spec even
    where Transformer Engine is importable (model.spec=auto would pick TE's); with ``backend``
    te a bf16 row on TE's spec sits between it and TE's FP8 row."""
    from r1mega.config import PrecisionConfig

    bf16 = PrecisionConfig(grad_reduce_in_fp32=fp32_grads)
    rows = {"bf16": (bf16, "local")}
    if backend == "te":
        rows["te-bf16"] = (bf16, "te")
    rows[f"fp8-{recipe}"] = (PrecisionConfig(fp8=True, fp8_backend=backend, fp8_recipe=recipe,
                                             fp8_emulate=backend == "native" and device.type != "cuda",
                                             grad_reduce_in_fp32=fp32_grads),
                             backend if backend == "te" else "local")
    return rows


def run_parity(args, rt) -> dict:
    from r1mega.bench.shapes import get_shape

    shape = get_shape("852m", smoke=args.smoke)
    corpus = BigramCorpus(shape["vocab_size"])
    # one pass over positions for every step's sequences at once (a loop per batch is slow)
    batches = list(corpus.batch(args.seqs * args.parity_steps, args.seq_len).split(args.seqs))
    curves, init = {}, None
    rows = _precisions(args.recipe, rt.device, backend=args.backend)
    base = "te-bf16" if args.backend == "te" else "bf16"
    names = [base, f"fp8-{args.recipe}"] + ([f"{base}-again"] if args.noise_floor else [])
    for name in names:  # one spec: the same initial weights load into every row
        prec, spec = rows[name.removesuffix("-again")]
        t = time.perf_counter()
        curves[name], init = train_losses({**shape, "spec": spec}, prec, batches, rt, init)
        print(f"{name:<18} first loss {curves[name][0]:.4f}  final {sum(curves[name][-10:]) / len(curves[name][-10:]):.4f}"
              f"  ({time.perf_counter() - t:.0f} s)")
    final = {k: sum(v[-10:]) / len(v[-10:]) for k, v in curves.items()}
    fp8_key = f"fp8-{args.recipe}"
    rel = final[fp8_key] / final[base] - 1.0
    # bf16 against itself: on a GPU two runs of one seed part (non-deterministic kernels), and the
    # bar means little where that spread is as wide as it
    floor = final[f"{base}-again"] / final[base] - 1.0 if args.noise_floor else None
    if floor is not None:
        print(f"final loss (mean of the last 10 steps): FP8 vs bf16 {rel:+.2%}, bf16 vs bf16 {floor:+.2%}")
    return {"mode": "parity", "recipe": args.recipe, "backend": args.backend, "steps": args.parity_steps,
            "final_loss": final, "first_loss": {k: v[0] for k, v in curves.items()},
            "relative_difference": rel, "bf16_vs_bf16_relative_difference": floor,
            "bar_met": None if args.smoke else bool(abs(rel) <= 0.02),
            "curves_every_10": {k: v[::10] for k, v in curves.items()}}


def run_throughput(args, rt) -> dict:
    from r1mega import switches
    from r1mega.bench.shapes import get_shape
    from r1mega.bench.flops import matmul_peak_flops, model_flops_per_token
    from r1mega.bench.train_step import _reset_memory, run_r1mega

    device = rt.device
    bf16_peak = matmul_peak_flops(device, rt.dtype, 8192 if device.type == "cuda" else 256)
    fp8_peak = fp8_matmul_flops(device)
    result = {"mode": "throughput", "recipe": args.recipe, "backend": args.backend, "compile": args.compile,
              "master_weights": args.master_weights, "moments_dtype": args.moments_dtype,
              "tokens_per_step": args.seqs * args.seq_len,
              "bf16_matmul_tflops": bf16_peak / 1e12, "fp8_matmul_tflops": fp8_peak / 1e12,
              "models": {}}
    print(f"{'model':<12}{'precision':<18}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}"
          f"{'of peak':>9}{'loss[0]':>10}")
    for model in args.models.split(","):
        shape = get_shape(model, smoke=args.smoke)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (args.seqs, args.seq_len), generator=g).to(device)
        flops_tok = model_flops_per_token(shape, args.seq_len)
        rows = {}
        # a bf16 master steps from a bf16 gradient buffer
        # (name, (precision, spec), environment) a row
        plan = [(n, ps, {}) for n, ps in _precisions(args.recipe, device, args.master_weights == "fp32",
                                                     args.backend).items()]
        fp8_name, fp8_ps, _ = plan[-1]
        extra = [(f"{fp8_name}+{e}", fp8_ps, _env_pairs(e)) for e in args.train_env]
        if args.fp8_again:  # the default FP8 row once more, last: how far a row drifts in one run
            extra.append((f"{fp8_name}-again", fp8_ps, {}))
        for name, (prec, spec), env in plan + extra:
            _reset_memory(device)
            if args.compile == "layer":  # every row traces afresh: a --train-env switch read
                torch._dynamo.reset()    # while tracing must not meet an earlier row's graph
            with switches.environment(env):
                sec, mem, losses, _ = run_r1mega({**shape, "spec": spec}, tokens, rt, "chunked",
                                                 args.warmup, args.steps,
                                                 args.compile, precision=prec,
                                                 master_weights=args.master_weights,
                                                 moments_dtype=args.moments_dtype)
            tflops = args.seqs * args.seq_len / sec * flops_tok / 1e12
            peak = fp8_peak if name != "bf16" else bf16_peak
            rows[name] = {"ms_per_step": sec * 1e3, "tokens_per_s": args.seqs * args.seq_len / sec,
                          "model_tflops": tflops, "fraction_of_matmul_peak": tflops * 1e12 / peak,
                          "peak_memory_gb": mem, "first_loss": float(losses[0])}
            print(f"{model:<12}{name:<18}{sec * 1e3:>10.1f}{rows[name]['tokens_per_s']:>12.0f}"
                  f"{tflops:>10.1f}{tflops * 1e12 / peak:>9.1%}{float(losses[0]):>10.4f}")
        fp8_ms = rows[f"fp8-{args.recipe}"]["ms_per_step"]
        speedup = rows["bf16"]["ms_per_step"] / fp8_ms
        bar = BARS[args.recipe] if model == "gemm-heavy" and not args.smoke else None
        result["models"][model] = {"rows": rows, "fp8_speedup": speedup, "bar": bar,
                                   "bar_met": None if bar is None else bool(speedup >= bar)}
        print(f"{model}: FP8 {args.recipe} / bf16 step throughput = {speedup:.2f}x"
              + (f" (bar {bar}x)" if bar else ""))
        if "te-bf16" in rows:  # TE's FP8 against TE's own bf16 layers too
            te_ratio = rows["te-bf16"]["ms_per_step"] / fp8_ms
            result["models"][model]["fp8_speedup_over_te_bf16"] = te_ratio
            print(f"{model}: FP8 {args.recipe} / TE bf16 step throughput = {te_ratio:.2f}x")
        result["models"][model]["extra_speedups"] = {
            n: rows["bf16"]["ms_per_step"] / rows[n]["ms_per_step"] for n, _, _ in extra}
        for n, ratio in result["models"][model]["extra_speedups"].items():
            print(f"{model}: {n} / bf16 step throughput = {ratio:.3f}x")
    return result


def _env_pairs(spec: str) -> dict:
    """``NAME=VALUE[,NAME=VALUE]`` -> {NAME: VALUE}; only R1MEGA_ switches."""
    pairs = {}
    for item in spec.split(","):
        k, eq, v = item.partition("=")
        if not eq or not k.startswith("R1MEGA_"):
            raise SystemExit(f"bench fp8: --train-env {spec!r}: expected R1MEGA_NAME=VALUE[,...]")
        pairs[k] = v
    return pairs


def _allocator_counts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    st = torch.cuda.memory_stats(device)
    return {k: st.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                      "num_sync_all_streams")}


# --variant NAME: one more FP8 row (weights + KV cache) in the same process with these switches
# on (module, attribute), each a kernel choice otherwise set by its R1MEGA_... variable at import,
# or (None, "R1MEGA_NAME=VALUE"): a variable read at each call, set for the row
ROLLOUT_VARIANTS = {
    "rows-cluster": (("r1mega.rollout.cuda_paged", "ROWS_CLUSTER"),),
    "rope": (("r1mega.rollout.cuda_paged_rope", "ROPE"),),
    "rope-rows-cluster": (("r1mega.rollout.cuda_paged_rope", "ROPE"), ("r1mega.rollout.cuda_paged", "ROWS_CLUSTER")),
    "wgmma": (("r1mega.precision.wgmma_gemm", "ENABLED"),),
    "wgmma-ws": (("r1mega.precision.wgmma_gemm", "ENABLED"), ("r1mega.precision.wgmma_gemm", "PRODUCER_WARP")),
    "rows-multi": (("r1mega.precision.triton_fp8_rows", "MULTI_ROW"),),
    "blockwise-cublas": ((None, "R1MEGA_FP8_BLOCKWISE_GEMM=cublas"),),
}


def _variant(name: Optional[str]):
    """A context with ``name``'s switches on (None: no change)."""
    import contextlib
    import importlib

    from r1mega import switches

    stack = contextlib.ExitStack()
    for mod, attr in ROLLOUT_VARIANTS[name] if name else ():
        if mod is None:
            stack.enter_context(switches.environment(_env_pairs(attr)))
        else:
            stack.enter_context(switches.overridden(importlib.import_module(mod), attr, True))
    return stack


def run_rollout(args, rt) -> dict:
    """bf16 vs FP8-weight rollout (``precision.fp8_rollout``) on the same model, same requests."""
    from r1mega.bench.host_stats import HostStats
    from r1mega.bench.rollout import _profile_prefill, _time_replays, device_busy, logprob_mismatch
    from r1mega.bench.shapes import get_shape
    from r1mega.config import ModelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.precision.policy import resolve_rollout_fp8_policy
    from r1mega.precision.rollout import Fp8RolloutWeights
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from torch._dynamo.utils import counters

    device = rt.device
    shape = get_shape("852m", smoke=args.smoke)
    prompts, plen, new = (4, 8, 8) if args.smoke else tuple(int(v) for v in args.rollout_setting.split("x"))
    shape["max_position_embeddings"] = plen + new + 8
    # both rows on the local spec: the FP8 copies hook its linears, not TE's fused layers
    model = build_model(ModelConfig(**{**shape, "spec": "local"}), rt, wrap=False)
    policy = resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe=args.recipe,
                                                        fp8_emulate=device.type != "cuda"), device.type)
    g = torch.Generator().manual_seed(prompts)
    ids = torch.randint(0, shape["vocab_size"], (prompts, plen), generator=g).tolist()
    reqs = [GenerationRequest(p, n=1, seed=i) for i, p in enumerate(ids)]
    rows = {}
    weights8, both8 = f"fp8-{args.recipe}", f"fp8-{args.recipe}+fp8kv"
    names = ("bf16", weights8) if args.no_fp8_kv else ("bf16", weights8, both8)
    if args.skip_weights_only:  # the bar's pair alone: bf16 and FP8 weights + FP8 KV cache
        if args.no_fp8_kv:
            raise SystemExit("bench fp8: --skip-weights-only and --no-fp8-kv leave one row; pass one")
        names = ("bf16", both8)
    if args.fp8_first:  # whether a row's host time depends on running second (the heap, threads)
        names = names[1:] + names[:1]
    variants = {}
    for v in args.variant:
        if args.no_fp8_kv:
            raise SystemExit("bench fp8: --variant rows take the FP8 KV cache; drop --no-fp8-kv")
        variants[f"{both8}+{v}"] = v
    names = tuple(names) + tuple(variants)
    for name in names:
        with _variant(variants.get(name)):
            rcfg = RolloutConfig(temperature=1.0, max_new_tokens=new, kv_memory_fraction=0.5,
                                 max_batch_sequences=max(256, prompts), cuda_graphs=not args.no_graphs,
                                 compile_decode=not args.no_compile,
                                 max_prefill_tokens=max(16384, prompts * plen // 4),
                                 kv_cache_dtype="fp8" if name == both8 or name in variants else "auto")
            fp8 = Fp8RolloutWeights(model[0], policy) if name != "bf16" else None
            eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=shape["vocab_size"])

            def generate(requests):
                if fp8 is None:
                    return eng.generate(requests)
                with fp8.decoding():
                    return eng.generate(requests)

            counters.clear()  # dynamo's graph breaks in this row's compiles (a split decode step)
            t = time.perf_counter()
            generate([GenerationRequest(p, n=1, seed=i + 7919) for i, p in enumerate(ids)])  # warm-up
            _sync(device)
            warm = time.perf_counter() - t
            alloc0 = _allocator_counts(device)
            with HostStats() as host:
                t = time.perf_counter()
                outs = generate(reqs)
                _sync(device)
                dt = time.perf_counter() - t
            alloc1 = _allocator_counts(device)
            n_new = sum(len(c.token_ids) for c in outs)
            st = eng.stats  # where the timed call went: prefill, decode steps, graph captures
            split = {k: st[k] for k in ("prefill_s", "decode_s", "decode", "prefill", "capture_s",
                                        "decode_compiled")}
            split["graph_breaks"] = sum(counters["graph_break"].values())
            # the timed call's cudaMalloc / cudaFree and allocator retries (a retry frees the cache
            # after synchronising the device: host gaps that no kernel profile shows)
            split["allocator"] = {k: alloc1[k] - alloc0[k] for k in alloc0}
            split["host"] = host.result()  # the collector's pauses and other threads' CPU time
            if args.host_profile:  # where the host's time goes in one more call (cProfile)
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                generate(reqs)
                _sync(device)
                prof.disable()
                print(f"==== {name}: host profile of one call (cProfile, own time)")
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            if args.profile_kernels:  # where each row's decode step and prefill spend device time
                print(f"==== {name}")
                split["busy"] = device_busy(lambda: generate(reqs)) if device.type == "cuda" else None
                if split["busy"] is not None:
                    bz = split["busy"]
                    print(f"the same call profiled: device busy {bz['device_busy_s']:.3f} s of "
                          f"{bz['wall_s']:.3f} s wall ({bz['device_busy_s'] / bz['wall_s']:.0%}); idle in "
                          f"gaps over 20 us {bz['idle_in_gaps_over_20us_s']:.3f} s; [gaps, us idle] before: "
                          f"{bz['idle_before_kernel_us']}")
                _time_replays(eng, profile=True)
                if fp8 is None:
                    _profile_prefill(eng, ids, name)
                else:
                    with fp8.decoding():
                        _profile_prefill(eng, ids, name)
            # Against the training forward, which stays bf16 (outside decoding()).
            mean, mx = logprob_mismatch(model, outs[: args.mismatch_seqs], ids)
            eng.release()
            if fp8 is not None:
                fp8.remove()
            rows[name] = {"tokens_per_s": n_new / dt, "seconds": dt, "warmup_s": warm,
                          "logprob_mismatch_mean": mean, "logprob_mismatch_max": mx, **split}
            print(f"{name:<26} {n_new / dt:>12,.0f} tok/s  ({dt:.2f} s, warm-up {warm:.1f} s)  "
                  f"log-prob |diff| vs training: mean {mean:.2e}, max {mx:.2e}", flush=True)
            print(f"{'':<26} prefill {split['prefill_s']:.3f} s in {split['prefill']} steps, decode "
                  f"{split['decode_s']:.3f} s in {split['decode']} steps "
                  f"({split['decode_s'] / max(split['decode'], 1) * 1e3:.3f} ms each), graph captures "
                  f"{split['capture_s']:.2f} s; decode compiled: {split['decode_compiled']}, "
                  f"{split['graph_breaks']} graph breaks; allocator {split['allocator']}", flush=True)
            print(f"{'':<26} host: {split['host']}", flush=True)
    speedup = rows[weights8]["tokens_per_s"] / rows["bf16"]["tokens_per_s"] if weights8 in rows else None
    both = rows[both8]["tokens_per_s"] / rows["bf16"]["tokens_per_s"] if both8 in rows else None
    for name in variants:
        print(f"{name} / bf16 rollout tokens/s = "
              f"{rows[name]['tokens_per_s'] / rows['bf16']['tokens_per_s']:.2f}x (bar 1.4x)")
    if speedup is not None:
        print(f"FP8 {args.recipe} rollout / bf16 rollout tokens/s = {speedup:.2f}x (bar 1.4x)")
    if both is not None:
        print(f"FP8 {args.recipe} weights + FP8 KV cache / bf16 rollout tokens/s = {both:.2f}x (bar 1.4x)")
    from r1mega.precision.rollout import act_choice
    from r1mega.precision.triton_act_gemm import gemm_choice

    return {"mode": "rollout", "recipe": args.recipe, "setting": f"{prompts}x{plen}->{new}",
            "rollout_gemm": gemm_choice(), "rollout_act": act_choice(),
            "rows": rows, "fp8_speedup": speedup, "fp8_kv_speedup": both,
            "variant_speedups": {n: rows[n]["tokens_per_s"] / rows["bf16"]["tokens_per_s"] for n in variants},
            "bar_met": None if args.smoke or speedup is None else bool(speedup >= 1.4),
            "bar_met_with_fp8_kv": None if args.smoke or both is None else bool(both >= 1.4)}


def main(argv=None) -> int:
    from r1mega.bench.train_step import add_optimizer_state_args

    ap = argparse.ArgumentParser(prog="r1mega bench fp8", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="blockwise",
                    help="native: tensorwise, rowwise, blockwise; te: current, delayed, blockwise, mxfp8")
    ap.add_argument("--backend", default="native", choices=["native", "te"],
                    help="throughput and parity: r1mega's FP8 linear, or Transformer Engine's "
                         "layers and fp8_autocast (needs TE importable)")
    ap.add_argument("--models", default="852m,gemm-heavy")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="none", choices=["none", "layer"],
                    help="throughput: both rows with each transformer layer through torch.compile "
                         "(one graph a layer: the FP8 linears are custom ops in it)")
    ap.add_argument("--profile", action="store_true",
                    help="throughput: after timing, the top device kernels of one step of each row")
    add_optimizer_state_args(ap, master_help="throughput: optimizer.master_weights of both rows",
                             moments_help="throughput: optimizer.moments_dtype of both rows")
    ap.add_argument("--train-env", action="append", default=[], metavar="R1MEGA_NAME=VALUE[,...]",
                    help="throughput: one more FP8 row built and run with these switches set "
                         "(repeatable), e.g. R1MEGA_FP8_WEIGHT_AMAX=1")
    ap.add_argument("--fp8-again", action="store_true",
                    help="throughput: the default FP8 row once more, after the others")
    ap.add_argument("--parity", action="store_true", help="loss parity (852m, fixed corpus)")
    ap.add_argument("--parity-steps", type=int, default=200)
    ap.add_argument("--noise-floor", action="store_true",
                    help="parity: train bf16 a second time and report bf16 against bf16 too")
    ap.add_argument("--rollout", action="store_true",
                    help="bf16 vs FP8-weight rollout tokens/s and log-prob mismatch (852m)")
    ap.add_argument("--rollout-setting", default="256x128x256", help="PROMPTSxPROMPT_TOKENSxNEW")
    ap.add_argument("--no-graphs", action="store_true", help="rollout: eager decode")
    ap.add_argument("--no-compile", action="store_true", help="rollout: no torch.compile")
    ap.add_argument("--no-fp8-kv", action="store_true", help="rollout: skip the FP8 KV cache row")
    ap.add_argument("--fp8-first", action="store_true",
                    help="rollout: time the FP8 rows before the bf16 row")
    ap.add_argument("--skip-weights-only", action="store_true",
                    help="rollout: skip the FP8-weights row (bf16 vs FP8 weights + FP8 KV cache only)")
    ap.add_argument("--variant", action="append", default=[], choices=sorted(ROLLOUT_VARIANTS),
                    help="rollout: one more FP8 row (weights + KV cache) with these kernel switches on "
                         "(repeatable): " + "; ".join(f"{k}: {', '.join(a for _, a in v)}"
                                                      for k, v in ROLLOUT_VARIANTS.items()))
    ap.add_argument("--mismatch-seqs", type=int, default=16)
    ap.add_argument("--host-profile", action="store_true",
                    help="rollout: cProfile one more call of each row (where the host's time goes)")
    ap.add_argument("--profile-kernels", action="store_true",
                    help="rollout: each row's captured decode step replayed (ms per bucket) and "
                         "its top kernels, and the top kernels of its prefill")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, FP8 emulated")
    args = ap.parse_args(argv)
    from r1mega.precision.policy import NATIVE_RECIPES, TE_RECIPES

    recipes = TE_RECIPES if args.backend == "te" else NATIVE_RECIPES
    if args.recipe not in recipes:
        raise SystemExit(f"bench fp8: --recipe {args.recipe} is not a {args.backend} recipe; "
                         f"choose one of {', '.join(recipes)}.")
    if args.backend == "te" and (args.rollout or args.smoke):
        raise SystemExit("bench fp8 --backend te: throughput and parity on a GPU with Transformer "
                         "Engine only (the FP8 rollout and the CPU smoke run are native).")

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import read_launch_env
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    if args.smoke:
        args.seqs, args.seq_len, args.steps, args.warmup = 2, 64, 2, 1
        args.parity_steps = min(args.parity_steps, 8)
    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=read_launch_env())
    if rt.world_size != 1:
        raise SystemExit("bench fp8 runs on one process (no torchrun).")
    from r1mega.bench import train_step

    train_step._PROFILE["on"] = args.profile
    try:
        run = run_parity if args.parity else run_rollout if args.rollout else run_throughput
        result = run(args, rt)
    finally:
        destroy_parallel()
    from r1mega.precision.cuda_quant import dual_impl

    result.update(device=str(rt.device), smoke=args.smoke, dual_quantizer=dual_impl())
    from r1mega.bench.train_step import _no_nan

    print(json.dumps(_no_nan(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
