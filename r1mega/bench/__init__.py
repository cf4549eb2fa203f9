"""`r1mega bench NAME`: every benchmark prints a human table, then one JSON object on its last line.

Benchmarks live here, not in tests: speed and memory bars are measured, never asserted in CI.
"""
from __future__ import annotations

import importlib
import sys

# name -> module exposing main(argv) -> int
BENCHMARKS = {
    "train-step": "r1mega.bench.train_step",
    "grpo-loss": "r1mega.bench.grpo_loss",
    "rollout": "r1mega.bench.rollout",
    "moe-dispatch": "r1mega.bench.moe_dispatch",
    "fp8": "r1mega.bench.fp8",
    "fp8-decode-gemm": "r1mega.bench.fp8_decode_gemm",
    "dsv3-train-step": "r1mega.bench.dsv3_train_step",
    "dsv3-rollout": "r1mega.bench.dsv3_rollout",
    "saved-activations": "r1mega.bench.saved_activations",
    "train-scale": "r1mega.bench.train_scale",
    "rollout-tp": "r1mega.bench.rollout_tp",
    "decode-attention": "r1mega.bench.decode_attention",
    "exact-swiglu": "r1mega.bench.exact_swiglu",
    "exact-gemm": "r1mega.bench.exact_gemm",
    "lean-adam": "r1mega.bench.lean_adam",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: r1mega bench NAME [args]\n\nbenchmarks:")
        for name in BENCHMARKS:
            print(f"  {name}")
        return 0 if argv else 2
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"r1mega bench: unknown benchmark '{name}'; choose one of {sorted(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[name]).main(argv[1:]) or 0)
