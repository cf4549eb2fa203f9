"""`r1mega bench rollout`: the rollout engine vs Hugging Face transformers ``generate()``.

Shape: ``--model`` names one of r1mega/bench/shapes.py (default the dense 852M: 16 layers, hidden
2048, 16 heads, 4 KV groups, FFN 5632, vocab 32000; ``qwen3-moe-small``: 12 layers, 64 experts
top-8, against ``Qwen3MoeForCausalLM`` of the same shape), random weights, bf16, sampling at
temperature 1, every sequence run to the token limit (no EOS). Settings (prompts x prompt tokens
-> new tokens): 256 x 128 -> 256 and 64 x 128 -> 512.

Reported per setting: tokens/s of both, the ratio (bar: >= 20x dense, >= 15x MoE), and the decode
roofline fraction: the bytes a decode step must read (all weights once, which for an MoE decode
batch of hundreds of rows is every expert too, + the KV cache of every running sequence), summed
over the decode steps, at the device-copy bandwidth measured in this run, divided by the measured
generation time (prefill included, so this is a lower bound). Also the bf16 mismatch between the
rollout's log-probs and the training forward's for the same tokens; for MoE models also on a
rollout that records its routes (rollout.routing_replay, eager decode), with the training
forward routing freely and with the recorded routes replayed.

``--kv-fp8`` adds an ``fp8kv`` mode in the same run: the default mode with
``rollout.kv_cache_dtype=fp8`` (e4m3 K/V + per-(token, head) scales, r1mega/rollout/kv_cache.py),
its tokens/s and ratio to the default, its roofline with the KV bytes it really reads (1 byte per
element + 4 per token and head), and its log-prob mismatch against the training forward.

``--smoke`` runs a tiny shape of the named model on CPU (no peer) to check the script end to end.

Measured on one H200 (torch 2.11, CUDA graphs + compiled decode step + fused Triton sampling,
overlapped steps), side by side: 256x128->256: 89,288 vs HF 2,379 tokens/s = 37.5x (30.9% of the
decode roofline); 64x128->512: 38,461 vs HF 915 tokens/s = 42.0x (34.0%); bf16 log-prob |diff|
vs the training forward over 16 sequences: mean 1.8e-2, max 9.3e-2. Graph replay of one decode
step at 256 rows: 2.46 ms (2.79 ms with the unfused PyTorch sampler).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from r1mega.bench.shapes import get_shape

# The bar on the H200: tokens/s over transformers generate()'s (issue #1 dense, issue #16 MoE).
BAR_DENSE, BAR_MOE = 20.0, 15.0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def decode_bytes(weight_bytes: int, kv_bytes_per_token: int, prompts: int, prompt_len: int, new: int) -> int:
    """Bytes read by all decode steps: weights once per step, plus each sequence's KV cache."""
    steps = new - 1  # the first new token comes from the prefill
    ctx_sum = sum(prompt_len + i + 1 for i in range(1, new))  # cache length seen at each step
    return steps * weight_bytes + prompts * ctx_sum * kv_bytes_per_token


def hf_peer(mcfg, experts_impl=None):
    """transformers' model of ``mcfg``'s shape (LlamaForCausalLM, Qwen3MoeForCausalLM, ...) through
    the converter's config.json mapping, random weights. ``experts_impl``: transformers 5's
    ``experts_implementation`` for MoE models (None: its default)."""
    import transformers

    from r1mega.convert.hf_config import hf_config_from_model_config

    conf = transformers.AutoConfig.for_model(**hf_config_from_model_config(mcfg))
    kw = {"experts_implementation": experts_impl} if experts_impl and mcfg.num_experts else {}
    return transformers.AutoModelForCausalLM.from_config(conf, **kw)


def run_hf(mcfg, prompts: int, prompt_len: int, new: int, device, experts_impl=None) -> float:
    shape = {"vocab_size": mcfg.vocab_size}
    model = hf_peer(mcfg, experts_impl).to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, shape["vocab_size"], (prompts, prompt_len), device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4,
                       min_new_tokens=4, **kw)
        _sync()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, **kw)
        _sync()
        dt = time.perf_counter() - t
    n_new = (out.shape[1] - prompt_len) * prompts
    del model
    torch.cuda.empty_cache()
    return n_new / dt


def logprob_mismatch(model, completions, prompts, replay: bool = False) -> tuple[float, float]:
    """Mean and max |rollout log-prob - training forward log-prob| over the given completions.
    ``replay``: the training forward routes each MoE layer as the rollout recorded it
    (``Completion.routes``; the last token, never fed in the rollout, routes freely)."""
    import contextlib

    from r1mega.models.attention import make_packed_seqs
    from r1mega.moe.replay import RoutingReplay, routing_context

    diffs = []
    with torch.no_grad():
        for c in completions:
            full = prompts[c.prompt_index] + c.token_ids
            ids = torch.tensor([full], device=next(model[0].parameters()).device)
            ctx = contextlib.nullcontext()
            if replay:
                routes = c.routes.to(ids.device, torch.int64)                     # (L, n - 1, k)
                free = routes.new_full((routes.shape[0], 1, routes.shape[2]), -1)
                ctx = routing_context(model, replay=RoutingReplay(torch.cat([routes, free], dim=1)))
            with ctx:
                logits = model[0](input_ids=ids, position_ids=None, attention_mask=None,
                                  packed_seq_params=make_packed_seqs([len(full)], ids.device))[0]
            lp = torch.log_softmax(logits.float(), dim=-1)
            L = len(prompts[c.prompt_index])
            tok = torch.tensor(c.token_ids, device=ids.device)
            ref = lp[L - 1:-1].gather(1, tok[:, None]).squeeze(1)
            diffs.append((ref - torch.tensor(c.logprobs, device=ids.device)).abs())
    d = torch.cat(diffs)
    return d.mean().item(), d.max().item()


def _profile_prefill(eng, ids, label: str) -> None:
    """The top kernels of prefilling ``ids`` (one new token each: the prefill and its sample)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from r1mega.rollout.types import GenerationRequest

    reqs = [GenerationRequest(p, n=1, seed=i, max_new_tokens=1) for i, p in enumerate(ids)]
    eng.generate(reqs)
    _sync()
    cuda = torch.cuda.is_available()  # the CPU smoke run lists operators instead
    with tprofile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        eng.generate(reqs)
        _sync()
    print(f"---- {label} prefill of {len(ids)} prompts: top kernels")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=18,
                                    max_name_column_width=70))


def device_busy(run) -> dict:
    """Call ``run()`` under the profiler: the share of its wall time the GPU spent in kernels and
    copies (the union of their intervals), and the idle time in gaps longer than 20 us (a
    host that falls behind the overlapped decode shows there)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    _sync()
    t = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        _sync()
    wall = time.perf_counter() - t
    named = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    spans = [(a, b) for a, b, _ in named]
    busy, span, idle_long = interval_union(spans, min_gap=20.0)
    return {"wall_s": wall, "device_busy_s": busy * 1e-6, "device_span_s": span * 1e-6,
            "idle_in_gaps_over_20us_s": idle_long * 1e-6,
            "idle_before_kernel_us": idle_before(named, min_gap=20.0)}


def idle_before(named, min_gap: float, top: int = 8) -> dict:
    """Sorted (start, end, name) intervals -> {name: [gaps, idle]} for the ``top`` names that
    the most idle time (gaps over ``min_gap``) comes right before: the device waits there for
    the host (a synchronisation, or host work between launches)."""
    out: dict = {}
    end = None
    for a, b, name in named:
        if end is not None and a - end > min_gap:
            row = out.setdefault(name[:70], [0, 0.0])
            row[0] += 1
            row[1] += a - end
        end = b if end is None else max(end, b)
    best = sorted(out.items(), key=lambda kv: -kv[1][1])[:top]
    return {k: [n, round(t, 1)] for k, (n, t) in best}


def interval_union(spans, min_gap: float) -> tuple[float, float, float]:
    """Sorted (start, end) intervals -> (length of their union, first start to last end, the
    total of the gaps between them longer than ``min_gap``)."""
    busy = idle = 0.0
    end = None
    for a, b in spans:
        if end is None or a > end:
            if end is not None and a - end > min_gap:
                idle += a - end
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy, (end - spans[0][0]) if spans else 0.0, idle


def _time_replays(eng, profile: bool = False) -> None:
    """Device time of one captured decode step per bucket (the host's share is the rest);
    ``profile``: the top kernels of the largest bucket's replay."""
    g = eng.graphs
    if g is None or not g.graphs:
        return
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile

        b = max(g.graphs)
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.graphs[b].replay()
            _sync()
        print(f"---- decode graph replay, bucket {b}, 5 replays: top kernels")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=26, max_name_column_width=150))
    for b in (16, 64, 128, 256):
        if b not in g.graphs:
            continue
        for _ in range(3):
            g.graphs[b].replay()
        _sync()
        t = time.perf_counter()
        for _ in range(20):
            g.graphs[b].replay()
        _sync()
        print(f"graph replay, bucket {b}: {(time.perf_counter() - t) / 20 * 1e3:.3f} ms "
              f"(padding rows: context 1)", flush=True)


def _replay_mismatch(model, rt, rcfg, reqs, prompts, vocab_size) -> dict:
    """MoE: rollout ``reqs`` recording routes (eager: recording turns the decode graphs off), then
    the log-prob mismatch of the training forward routing freely and replaying the routes."""
    import dataclasses

    from r1mega.rollout.engine import RolloutEngine

    eng = RolloutEngine(model, dataclasses.replace(rcfg, routing_replay=True), rt, eos_ids=[],
                        vocab_size=vocab_size)
    outs = eng.generate(reqs)
    eng.release()
    return ({"replay_off": logprob_mismatch(model, outs, prompts),
             "replay_on": logprob_mismatch(model, outs, prompts, replay=True)},
            route_flip_fraction(model, outs, prompts))


def route_flip_fraction(model, completions, prompts) -> float:
    """Share of (MoE layer, fed token) pairs whose expert set in the freely routed training
    forward differs from the one the rollout recorded: what routing replay removes."""
    from r1mega.models.attention import make_packed_seqs
    from r1mega.moe.replay import RoutingCapture, routing_context

    flips = total = 0
    with torch.no_grad():
        for c in completions:
            full = prompts[c.prompt_index] + c.token_ids
            ids = torch.tensor([full], device=next(model[0].parameters()).device)
            cap = RoutingCapture()
            with routing_context(model, capture=cap):
                model[0](input_ids=ids, position_ids=None, attention_mask=None,
                         packed_seq_params=make_packed_seqs([len(full)], ids.device))
            free = cap.take()[:, :c.routes.shape[1]].sort(-1).values.cpu()      # (L, n, k)
            rec = c.routes.long().sort(-1).values
            flips += int((free != rec).any(-1).sum())
            total += rec.shape[0] * rec.shape[1]
    return flips / max(total, 1)


def _finite(obj):
    """NaN (a peer not run, no GPU bandwidth) -> null, so the JSON line is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _exact_summary(results: dict, gap: dict) -> dict:
    """Exact-mode tokens/s over the default mode's (same setting, same run) and the gap."""
    ratios = {k: r["exact"]["rollout_tokens_per_s"] / r[next(iter(r))]["rollout_tokens_per_s"]
              for k, r in results.items() if "exact" in r}
    return {"throughput_vs_default": ratios, "logprob_gap": gap,
            "bar_met": bool(gap) and gap["max_abs_diff"] == 0.0 and gap["tokens"] >= 10_000
            and all(v >= 0.75 for v in ratios.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench rollout")
    ap.add_argument("--model", default="852m", help="a shape of r1mega/bench/shapes.py")
    ap.add_argument("--hf-experts-impl", default=None,
                    help="transformers' experts_implementation for the MoE peer (default: its own)")
    ap.add_argument("--settings", default="256x128x256,64x128x512",
                    help="comma list of PROMPTSxPROMPT_TOKENSxNEW_TOKENS")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers generate()")
    ap.add_argument("--smoke", action="store_true", help="tiny shape (CPU check of the script)")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    ap.add_argument("--no-compile", action="store_true", help="rollout.compile_decode=false")
    ap.add_argument("--overlap", action="store_true",
                    help="overlapped decode steps (launch k+1 before reading k), as the trainer's "
                         "rollout.overlap_steps default; the --exact and --kv-fp8 rows overlap too")
    ap.add_argument("--overlap-too", action="store_true",
                    help="time synchronous and overlapped decoding in the same run (same peer)")
    ap.add_argument("--mismatch-seqs", type=int, default=16)
    ap.add_argument("--exact", action="store_true", help="also time rollout.exact in the same "
                    "run, and its log-prob gap to the training forward (r1mega/bench/exact.py)")
    ap.add_argument("--exact-tokens", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=1,
                    help="timed runs per mode (same requests): the median's time and step split")
    ap.add_argument("--profile", action="store_true", help="cProfile the first setting's run")
    ap.add_argument("--profile-kernels", action="store_true",
                    help="after timing, the top kernels of the largest decode graph's replay and of a prefill")
    ap.add_argument("--kv-fp8", action="store_true",
                    help="also time rollout.kv_cache_dtype=fp8 (mode fp8kv) in the same run")
    ap.add_argument("--fp8", default=None, choices=["tensorwise", "rowwise", "blockwise"],
                    help="bf16 vs FP8-weight rollout in one run (= r1mega bench fp8 --rollout)")
    args = ap.parse_args(argv)
    if args.fp8:
        from r1mega.bench import fp8

        setting = args.settings.split(",")[0]
        return fp8.main(["--rollout", "--recipe", args.fp8, "--rollout-setting", setting,
                         "--mismatch-seqs", str(args.mismatch_seqs)]
                        + ["--smoke"] * args.smoke + ["--no-graphs"] * args.no_graphs
                        + ["--no-compile"] * args.no_compile
                        + ["--profile-kernels"] * args.profile_kernels)

    from r1mega.config import ModelConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    shape = get_shape(args.model, smoke=args.smoke)
    if args.exact:  # the exact mode runs r1mega's local layers: the default mode on them too
        shape["spec"] = "local"
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    if args.smoke:
        settings = [(4, 8, 8), (2, 8, 16)]
    port = int(os.environ.get("MASTER_PORT", "29511"))
    rt = init_parallel(ParallelConfig(), PrecisionConfig(), env=LaunchEnv(0, 1, 0, "127.0.0.1", port, "single"))
    device = rt.device
    max_len = max(p + n for _, p, n in settings) + 8
    mcfg = ModelConfig(**{**shape, "max_position_embeddings": max_len})
    is_moe = bool(mcfg.num_experts)
    model = build_model(mcfg, rt, wrap=False)
    n_params = sum(p.numel() for p in model[0].parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model[0].parameters())
    elem = torch.empty((), dtype=rt.dtype).element_size()
    head_dim = shape.get("kv_channels") or shape["hidden_size"] // shape["num_attention_heads"]
    kv_per_token = 2 * shape["num_layers"] * shape["num_query_groups"] * head_dim * elem
    # FP8 cache: one byte per element plus a float32 scale per token and KV head, for K and V.
    kv_per_token_fp8 = 2 * shape["num_layers"] * shape["num_query_groups"] * (head_dim + 4)
    bw = copy_bandwidth(device)
    rows, results = [], {}
    mism = (float("nan"), float("nan"))
    replay_mism, flip = {}, float("nan")
    modes = ["overlap" if args.overlap else "sync"] + (["overlap"] if args.overlap_too and not args.overlap else [])
    modes += ["exact"] if args.exact else []
    modes += ["fp8kv"] if args.kv_fp8 else []
    mism_fp8kv = (float("nan"), float("nan"))
    exact_gap = {}
    for prompts, plen, new in settings:
        g = torch.Generator().manual_seed(prompts)
        ids = torch.randint(0, shape["vocab_size"], (prompts, plen), generator=g).tolist()
        reqs = [GenerationRequest(p, n=1, seed=i) for i, p in enumerate(ids)]
        first = (prompts, plen, new) == settings[0]
        key = f"{prompts}x{plen}->{new}"
        timed = {}
        for mode in modes:
            rcfg = RolloutConfig(temperature=1.0, max_new_tokens=new, kv_memory_fraction=0.5,
                                 max_batch_sequences=max(256, prompts), cuda_graphs=not args.no_graphs,
                                 compile_decode=not args.no_compile and mode != "exact",
                                 max_prefill_tokens=max(16384, prompts * plen // 4),
                                 overlap_steps=mode == "overlap" or (mode in ("fp8kv", "exact")
                                                                    and modes[0] == "overlap"),
                                 exact=mode == "exact", kv_cache_dtype="fp8" if mode == "fp8kv" else "auto")
            eng = RolloutEngine(model, rcfg, rt, eos_ids=[], vocab_size=shape["vocab_size"])
            t = time.perf_counter()
            # Warm-up with the timed requests' shape: compiles kernels, sizes the KV cache and captures
            # the CUDA graph the timed run replays.
            eng.generate([GenerationRequest(p, n=1, seed=i + 7919) for i, p in enumerate(ids)])
            _sync()
            warm_s = time.perf_counter() - t
            prof = None
            if args.profile and first:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            runs = []
            for _ in range(max(1, args.reps)):
                t = time.perf_counter()
                outs = eng.generate(reqs)
                _sync()
                runs.append((time.perf_counter() - t, dict(eng.stats)))
            # the median run: one second of decoding is short beside the GPU clock's drift
            dt, run_stats = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            if prof is not None:
                import pstats

                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            if first and (mode in (modes[0], "fp8kv") or (mode == "exact" and args.profile_kernels)):
                if mode != modes[0]:
                    print(f"---- {mode} mode", flush=True)
                _time_replays(eng, profile=args.profile_kernels)
                if args.profile_kernels:
                    _profile_prefill(eng, ids, mode)
            n_new = sum(len(c.token_ids) for c in outs)
            assert n_new == prompts * new, f"expected every sequence to reach {new} tokens"
            if first and mode == modes[0] and args.mismatch_seqs:
                mism = logprob_mismatch(model, outs[: args.mismatch_seqs], ids)
                if is_moe:
                    replay_mism, flip = _replay_mismatch(model, rt, rcfg, reqs[: args.mismatch_seqs], ids,
                                                         shape["vocab_size"])
            if first and mode == "fp8kv" and args.mismatch_seqs:
                mism_fp8kv = logprob_mismatch(model, outs[: args.mismatch_seqs], ids)
            if len(timed) and mode == "overlap":
                # Same seeds, same weights: overlapping steps must not change a single token.
                base = timed[modes[0]][2]
                same = all(a.token_ids == b.token_ids for a, b in zip(base, outs))
                print(f"[{key}] overlap tokens identical to sync: {same}", flush=True)
            if mode == "exact" and not exact_gap:
                from r1mega.bench.exact import exact_logprob_gap

                exact_gap = exact_logprob_gap(model, outs, ids, min_tokens=args.exact_tokens)
                print(f"[{key} exact] log-prob gap to the training forward: max |diff| "
                      f"{exact_gap['max_abs_diff']:.3e} over {exact_gap['tokens']} tokens", flush=True)
            eng.release()
            if mode == "exact":  # the next setting's default mode runs the model as it was
                from r1mega.ops.batch_invariant import remove_exact_forward

                remove_exact_forward(model)
            timed[mode] = (dt, warm_s, outs, run_stats)
        del outs
        peer = float("nan") if (args.no_peer or args.smoke) else run_hf(mcfg, prompts, plen, new, device,
                                                                         args.hf_experts_impl)
        results[key] = {}
        for mode, (dt, warm_s, outs, st) in timed.items():
            kv_bytes = kv_per_token_fp8 if mode == "fp8kv" else kv_per_token
            floor_s = decode_bytes(weight_bytes, kv_bytes, prompts, plen, new) / bw
            n_new = prompts * new
            ours = n_new / dt
            results[key][mode] = dict(
                rollout_tokens_per_s=ours, hf_tokens_per_s=peer, ratio=ours / peer, seconds=dt,
                warmup_s=warm_s, roofline_fraction=floor_s / dt, decode_steps=st.get("decode"),
                preemptions=st.get("preemptions"), prefill_s=st.get("prefill_s"), decode_s=st.get("decode_s"))
            rows.append((f"{key} {mode}", ours, peer, ours / peer, floor_s / dt, dt))
            print(f"[{key} {mode}] rollout {ours:,.0f} tok/s in {dt:.2f} s (warm-up {warm_s:.1f} s; prefill "
                  f"{st['prefill_s']:.3f} s in {st['prefill']} steps, decode {st['decode_s']:.3f} s in "
                  f"{st['decode']} steps = {1e3 * st['decode_s'] / max(1, st['decode']):.2f} ms/step), "
                  f"HF {peer:,.0f} tok/s", flush=True)
        timed.clear()
    destroy_parallel()

    print(f"rollout bench: {n_params / 1e6:.0f}M params, {str(rt.dtype).replace('torch.', '')}, "
          f"device copy {bw / 1e12:.2f} TB/s, KV {kv_per_token} B/token"
          + (f" ({kv_per_token_fp8} B/token with the FP8 cache)" if args.kv_fp8 else ""))
    print(f"{'setting':<24}{'rollout tok/s':>15}{'HF tok/s':>12}{'ratio':>9}{'roofline':>10}{'time s':>9}")
    for key, ours, peer, ratio, roof, dt in rows:
        print(f"{key:<24}{ours:>15,.0f}{peer:>12,.0f}{ratio:>9.1f}{roof:>10.1%}{dt:>9.2f}")
    print(f"{str(rt.dtype).replace('torch.', '')} rollout vs training log-prob |diff|: mean {mism[0]:.2e}, "
          f"max {mism[1]:.2e} ({args.mismatch_seqs} sequences)")
    if args.kv_fp8:
        print(f"fp8kv rollout vs training log-prob |diff|: mean {mism_fp8kv[0]:.2e}, max {mism_fp8kv[1]:.2e}")
        for key, r in results.items():
            print(f"[{key}] fp8kv / {modes[0]} tokens/s = "
                  f"{r['fp8kv']['rollout_tokens_per_s'] / r[modes[0]]['rollout_tokens_per_s']:.2f}x")
    for name, (mean, worst) in replay_mism.items():
        print(f"  recording rollout, training forward {name.replace('_', ' ')}: mean {mean:.2e}, max {worst:.2e}")
    bar = BAR_MOE if is_moe else BAR_DENSE
    met = all(max(m["ratio"] for m in r.values()) >= bar for r in results.values())
    extra = {f"logprob_mismatch_{name}_{stat}": v for name, pair in replay_mism.items()
             for stat, v in zip(("mean", "max"), pair)}
    if args.kv_fp8:
        extra["logprob_mismatch_fp8kv_mean"], extra["logprob_mismatch_fp8kv_max"] = mism_fp8kv
        extra["fp8kv_speedup"] = {k: r["fp8kv"]["rollout_tokens_per_s"] / r[modes[0]]["rollout_tokens_per_s"]
                                  for k, r in results.items()}
    if is_moe:
        extra["route_flip_fraction"] = flip
        print(f"  routes the free training forward chose differently: {flip:.2%} of (layer, token)")
    print(json.dumps(_finite({"bench": "rollout", "model": args.model, "params": n_params,
                      "dtype": str(rt.dtype), "copy_bandwidth_Bps": bw, "settings": results,
                      "logprob_mismatch_mean": mism[0], "logprob_mismatch_max": mism[1], **extra,
                      "exact": _exact_summary(results, exact_gap) if args.exact else None,
                      "bar_ratio": bar, "bar_met": met})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
