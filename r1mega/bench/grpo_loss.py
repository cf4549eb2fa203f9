"""`r1mega bench grpo-loss`: the GRPO loss forward + backward on bf16 logits, CUDA kernel vs PyTorch.

Measured in one run: the device copy bandwidth (the floor is reading the logits once and writing
their gradient once at that bandwidth), plain PyTorch (fp32 log_softmax, gather, clipped loss,
autograd), r1mega's CUDA paths (fused one-pass kernel; two-pass kernels as used under tensor
parallelism) and the token-chunked PyTorch fallback. Time is the median of CUDA-event timings of calls queued
back to back, the host running ahead as it does in a training step (the fused path is also timed
starting each call from an idle device, which adds the host's Python and launch latency);
extra memory is the peak allocated above what existed before the step (inputs, logits) and
includes the logits' gradient, which every path must produce.
Bar (issue 3, H200): <= 3.5 ms and extra memory <= gradient + 64 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from r1mega.bench.timing import copy_bandwidth, median_ms
from r1mega.config import GRPOConfig
from r1mega.ops import _cuda_ext
from r1mega.ops.grpo_loss import grpo_loss, grpo_token_loss, last_kernel
from r1mega.ops.logprobs import vocab_parallel_logprobs

BAR_MS = 3.5
BAR_EXTRA_MB = 64


def _extra_mb(fn, logits):
    logits.grad = None  # the gradient each step makes counts as extra memory
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="r1mega bench grpo-loss", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over the paths")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--skip-chunked", action="store_true", help="skip the (slow) PyTorch fallback path")
    ap.add_argument("--variants", type=int, default=5, help="fused kernel shapes to time alone")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("grpo-loss benchmark needs a CUDA device")
        print(json.dumps({"bench": "grpo_loss", "error": "no CUDA device"}))
        return 1

    torch.manual_seed(0)
    n_tok, vocab = args.tokens, args.vocab
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, kl_beta=0.0)
    logits = (torch.randn(n_tok, vocab, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (n_tok,), device="cuda")
    adv = torch.randn(n_tok, device="cuda")
    mask = torch.ones(n_tok, device="cuda")
    with torch.no_grad():  # old policy = current one plus noise, so that some ratios clip
        old, _ = vocab_parallel_logprobs(logits.detach(), targets, vocab_size=vocab, impl="torch")
        old = old + 0.1 * torch.randn(n_tok, device="cuda")
    norm = float(n_tok)
    grad_mb = logits.numel() * logits.element_size() / 2**20
    logit_bytes = logits.numel() * logits.element_size()

    def step_plain():
        logits.grad = None
        x = logits.float() / args.temperature
        logp = torch.log_softmax(x, dim=-1).gather(1, targets[:, None]).squeeze(1)
        ratio = torch.exp(logp - old)
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high))
        ((pg * mask).sum() / norm).backward()

    def step(impl):
        def run():
            logits.grad = None
            loss, _ = grpo_loss(logits, targets, adv, old, mask, cfg=cfg, vocab_size=vocab,
                                temperature=args.temperature, normalizer=norm, impl=impl)
            loss.backward()
        return run

    def step_two_pass():
        logits.grad = None
        logp, _ = vocab_parallel_logprobs(logits, targets, vocab_size=vocab, temperature=args.temperature,
                                          impl="cuda")
        token_loss, _ = grpo_token_loss(logp, adv, old, mask > 0, cfg=cfg)
        (token_loss.sum() / norm).backward()

    bw = copy_bandwidth(logit_bytes, args.reps)
    floor_ms = 2 * logit_bytes / bw * 1e3
    rows = []
    ext = _cuda_ext.get()
    have_ext = ext is not None
    cases = [("plain_torch", step_plain)]
    if have_ext:
        cases += [("cuda", step("cuda")), ("cuda_two_pass", step_two_pass)]
    if not args.skip_chunked:
        cases += [("torch_chunked", step("torch"))]
    kernel = None
    for name, fn in cases:
        extra = _extra_mb(fn, logits)
        if name == "cuda":
            kernel = last_kernel()
        rows.append({"path": name, "ms_rounds": [], "extra_mb": extra})
        torch.cuda.empty_cache()
    # Paths are timed in interleaved rounds and each reports the median of its round medians: a
    # path timed once right after another can inherit its clock and allocator state (seen on the
    # H200: the same fused call read 3.44 ms first and 3.30 ms later in one run).
    for _ in range(args.rounds):
        for row, (name, fn) in zip(rows, cases):
            row["ms_rounds"].append(median_ms(fn, args.reps, args.warmup))
            if name == "cuda":  # the same call started from an idle device each time
                row.setdefault("ms_idle_start_rounds", []).append(
                    median_ms(fn, args.reps, args.warmup, sync_each=True))
            logits.grad = None
            torch.cuda.empty_cache()
    for row in rows:
        row["ms"] = statistics.median(row["ms_rounds"])
        if "ms_idle_start_rounds" in row:
            row["ms_idle_start"] = statistics.median(row["ms_idle_start_rounds"])
    kernel_only = {}
    if have_ext:  # the fused kernel alone, without the Python around it (checks, weights, metrics)
        logits.grad = None
        grad = torch.empty_like(logits)
        weights = mask / norm
        tg = targets.contiguous()
        # Every compiled kernel shape (R1MEGA_GRPO_FUSED_VARIANT), so the default can be chosen
        # from numbers measured on the machine.
        prev = os.environ.get("R1MEGA_GRPO_FUSED_VARIANT")
        for variant in range(args.variants):
            os.environ["R1MEGA_GRPO_FUSED_VARIANT"] = str(variant)
            if not ext.fused_supported(logits):
                continue
            call = lambda: ext.fused_grpo(logits.detach(), grad, tg, adv, old, None, None, weights,  # noqa: E731
                                          vocab, 1.0 / args.temperature, 0.8, 1.28, 0.0, 0.0, 3, 0.0)
            try:
                kernel_only[f"fused_v{variant}"] = {"ms": median_ms(call, args.reps, args.warmup),
                                                    "plan": list(ext.fused_plan(logits))}
            except RuntimeError as exc:  # a cluster shape this GPU cannot co-schedule
                kernel_only[f"fused_v{variant}"] = {"ms": float("nan"), "error": str(exc)[:200]}
        del grad
        # End to end with every kernel shape too: the default (variant 0 unless the environment
        # says otherwise) is chosen from these rows.
        timed = {k: v for k, v in kernel_only.items() if v["ms"] == v["ms"]}
        for vname in sorted(timed, key=lambda k: timed[k]["ms"]):
            os.environ["R1MEGA_GRPO_FUSED_VARIANT"] = vname.split("_v")[1]
            fn = step("cuda")
            extra = _extra_mb(fn, logits)
            rows.append({"path": f"cuda[{vname}]", "ms": median_ms(fn, args.reps, args.warmup),
                         "extra_mb": extra})
            torch.cuda.empty_cache()
        if prev is None:
            os.environ.pop("R1MEGA_GRPO_FUSED_VARIANT", None)
        else:
            os.environ["R1MEGA_GRPO_FUSED_VARIANT"] = prev

    plain = next(r for r in rows if r["path"] == "plain_torch")
    print(f"GRPO loss fwd+bwd: {n_tok} tokens x {vocab} vocab, bf16 logits ({logit_bytes / 1e9:.2f} GB), "
          f"{torch.cuda.get_device_name()}")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s -> floor (read logits + write grad) {floor_ms:.2f} ms; "
          f"gradient {grad_mb:.0f} MB")
    print(f"{'path':<20}{'ms':>9}{'x torch':>9}{'x floor':>9}{'extra MB':>11}")
    for r in rows:
        print(f"{r['path']:<20}{r['ms']:>9.3f}{plain['ms'] / r['ms']:>9.2f}{r['ms'] / floor_ms:>9.2f}"
              f"{r['extra_mb']:>11.0f}")
    for vname, v in kernel_only.items():
        print(f"{'kernel ' + vname:<20}{v['ms']:>9.3f}{plain['ms'] / v['ms']:>9.2f}{v['ms'] / floor_ms:>9.2f}"
              f"{'':>11}  plan [cluster, vec/thread, clusters, threads, shape] = {v.get('plan', v.get('error'))}")
    result = {"bench": "grpo_loss", "tokens": n_tok, "vocab": vocab, "dtype": "bfloat16",
              "device": torch.cuda.get_device_name(), "copy_bw_TBps": bw / 1e12, "floor_ms": floor_ms,
              "grad_mb": grad_mb, "plain_torch_ms": plain["ms"], "plain_torch_extra_mb": plain["extra_mb"],
              "paths": {r["path"]: {"ms": r["ms"], "extra_mb": r["extra_mb"], "ms_rounds": r.get("ms_rounds")}
                        for r in rows},
              "extension": have_ext, "cuda_kernel": kernel, "kernel_only": kernel_only}
    cuda = next((r for r in rows if r["path"] == "cuda"), None)
    if cuda is not None:
        print(f"cuda path started from an idle device each call: {cuda['ms_idle_start']:.3f} ms")
        result.update(cuda_ms=cuda["ms"], cuda_ms_idle_start=cuda["ms_idle_start"], cuda_extra_mb=cuda["extra_mb"], speedup_vs_torch=plain["ms"] / cuda["ms"],
                      ratio_to_floor=cuda["ms"] / floor_ms, bar_ms=BAR_MS,
                      meets_bar=bool(cuda["ms"] <= BAR_MS and cuda["extra_mb"] <= grad_mb + BAR_EXTRA_MB))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
