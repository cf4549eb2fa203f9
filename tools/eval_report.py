"""What a GRPO run's held-out evaluations say: the strict accuracy curve against steps, accuracy
per operator (arithmetic prompts), the format rate, the training reward beside the strict grade,
and sample completions (strictly correct ones, and the ones the reward paid that strict did not).

    python tools/eval_report.py RUN_DIR [--samples 4]

Reads RUN_DIR/eval/step_*.dp*.jsonl (written at every evaluation) and RUN_DIR/metrics.jsonl.
Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

_OP = re.compile(r"\d\s*([-+*/])\s*\d")


def operator_of(prompt: str) -> str:
    m = _OP.search(prompt)
    return m.group(1) if m else "?"


def load_evals(run_dir: str) -> dict:
    by_step: dict = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "step_*.dp*.jsonl"))):
        step = int(re.search(r"step_(\d+)", path).group(1))
        with open(path, encoding="utf-8") as f:
            by_step[step] += [json.loads(line) for line in f if line.strip()]
    return dict(sorted(by_step.items()))


def summarise_eval(rows: list) -> dict:
    per_op: dict = defaultdict(lambda: [0, 0])
    for r in rows:
        op = per_op[operator_of(r["prompt"])]
        op[0] += bool(r["strict"])
        op[1] += 1
    n = max(len(rows), 1)
    fmt = sum("<think>" in r["completion"] and "<answer>" in r["completion"] for r in rows)
    return {"n": len(rows), "strict_accuracy": sum(bool(r["strict"]) for r in rows) / n,
            "reward_mean": sum(r["reward"] for r in rows) / n,
            "reward_paid_strict_wrong": sum(r["reward"] >= 1.0 and not r["strict"] for r in rows) / n,
            "tags_share": fmt / n,
            "per_operator": {k: {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per_op.items())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--samples", type=int, default=4)
    a = ap.parse_args()
    evals = load_evals(a.run_dir)
    if not evals:
        print(json.dumps({"bench": "eval_report", "error": f"no evaluations in {a.run_dir}/eval"}))
        return
    curve = {step: summarise_eval(rows) for step, rows in evals.items()}
    print(f"{'step':>6} {'prompts':>7} {'strict':>7} {'reward':>7} {'paid,wrong':>10} {'tags':>5}  "
          "per operator")
    for step, s in curve.items():
        ops = "  ".join(f"{k}: {v['accuracy']:.3f} ({v['n']})" for k, v in s["per_operator"].items())
        print(f"{step:>6} {s['n']:>7} {s['strict_accuracy']:>7.3f} {s['reward_mean']:>7.3f} "
              f"{s['reward_paid_strict_wrong']:>10.3f} {s['tags_share']:>5.2f}  {ops}")
    first, last = next(iter(curve)), next(reversed(curve))
    rows = evals[last]
    print(f"\nstrictly correct completions at step {last}:")
    for r in [r for r in rows if r["strict"]][:a.samples]:
        print(f"  {r['prompt']!r} -> {r['completion'][-200:]!r}")
    print(f"wrong completions at step {last}:")
    for r in [r for r in rows if not r["strict"]][:a.samples]:
        print(f"  {r['prompt']!r} -> {r['completion'][-200:]!r} ({r['strict_reason']})")
    paid = [r for r in rows if r["reward"] >= 1.0 and not r["strict"]]
    print(f"paid by the reward, wrong by the strict grader: {len(paid)}")
    for r in paid[:a.samples]:
        print(f"  {r['prompt']!r} -> {r['completion'][-200:]!r} ({r['strict_reason']})")
    gain = curve[last]["strict_accuracy"] - curve[first]["strict_accuracy"]
    print(json.dumps({"bench": "eval_report", "first_step": first, "last_step": last,
                      "strict_before": curve[first]["strict_accuracy"],
                      "strict_after": curve[last]["strict_accuracy"], "gain_points": 100 * gain,
                      "curve": {str(k): v for k, v in curve.items()}}))


if __name__ == "__main__":
    main()
