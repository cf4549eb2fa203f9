"""Summarise a GRPO run from its metrics.jsonl: a short human table, then one JSON line.

    python tools/grpo_run_summary.py RUN_DIR/metrics.jsonl [--steps N] [--warmup 2]
                                     [--baseline-tokens-per-s 1250] [--json-out FILE]

Works on a partial log (a run cut short, or one that died): it summarises the steps that were
logged, says so, and never fails on missing keys. Rows it reads (see r1mega/train/grpo.py and
trainer.py): step rows carry ``time/step_s``; evaluation rows carry ``eval/accuracy`` (the first
one is "before RL", a later one "after RL").

End-to-end completion tokens/s of a step = the completion tokens it generated / its wall time,
where the wall time is the gap between its log row and the previous step's (everything the loop
does, logging included; ``time/step_s`` for the first row), averaged over the steps after the
warm-up steps (CUDA graph capture, kernel builds and allocator growth land in those).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional

SPLIT = (("rollout", "time/rollout_s"), ("reward", "time/reward_s"),
         ("logprobs", "time/logprobs_s"), ("train", "time/train_s"))


def read_rows(path: str) -> list:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
    except OSError as exc:
        print(f"cannot read {path}: {exc}")
    return rows


def mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list, warmup: int, baseline: float, exclude=()) -> dict:
    steps = [r for r in rows if "time/step_s" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    before = evals[0] if evals and evals[0]["step"] < (steps[0]["step"] if steps else 1) else None
    after = evals[-1] if evals and evals[-1] is not before else None
    # wall time per step: the gap to the previous step row (only when they are neighbours)
    for prev, row in zip([None] + steps[:-1], steps):
        gap = row["time"] - prev["time"] if prev and row["step"] == prev["step"] + 1 else None
        row["_wall_s"] = gap if gap and gap > 0 else row["time/step_s"]
        tokens = row.get("rollout/completion_tokens")
        if tokens is None and "response/length_mean" in row and "rollout/completions" in row:
            tokens = row["response/length_mean"] * row["rollout/completions"]
        row["_tokens"] = tokens
    timed = steps[warmup:] if len(steps) > warmup else steps
    n_warm = len(steps) - len(timed)
    timed = [r for r in timed if r["step"] not in set(exclude)]  # e.g. a profiled step
    tps = [r["_tokens"] / r["_wall_s"] for r in timed if r["_tokens"] is not None and r["_wall_s"] > 0]
    tail = steps[-min(5, len(steps)):] if steps else []
    e2e = mean(tps)
    out = {
        "steps_done": len(steps),
        "timed_steps": len(timed), "warmup_steps_excluded": n_warm,
        "other_steps_excluded": sorted(set(exclude)),
        "eval_accuracy_before": before and before["eval/accuracy"],
        "eval_accuracy_after": after and after["eval/accuracy"],
        "eval_reward_before": before and before.get("eval/reward_mean"),
        "eval_reward_after": after and after.get("eval/reward_mean"),
        "eval_prompts": (before or after or {}).get("eval/num_prompts"),
        "train_reward_first_step": steps[0].get("reward/mean") if steps else None,
        "train_reward_last5": mean(r.get("reward/mean") for r in tail),
        "train_accuracy_first_step": steps[0].get("reward/accuracy") if steps else None,
        "train_accuracy_last5": mean(r.get("reward/accuracy") for r in tail),
        "time_split_s": {name: mean(r.get(key) for r in timed) for name, key in SPLIT},
        "step_s": mean(r["time/step_s"] for r in timed),
        "wall_s_per_step": mean(r["_wall_s"] for r in timed),
        "completion_tokens_per_step": mean(r["_tokens"] for r in timed),
        "response_length_mean": mean(r.get("response/length_mean") for r in timed),
        "completion_tokens_per_s": e2e,
        "completion_tokens_per_s_aggregate": (
            sum(r["_tokens"] for r in timed) / sum(r["_wall_s"] for r in timed)
            if timed and all(r["_tokens"] is not None for r in timed) else None),
        "rollout_tokens_per_s": mean(r.get("throughput/rollout_tokens_per_s") for r in timed),
        "baseline_trl_tokens_per_s": baseline,
        "ratio_vs_trl": e2e / baseline if e2e and baseline else None,
        "gpu_peak_gb": max((r.get("memory/gpu_peak_gb", 0.0) for r in steps), default=None) or None,
        # on-policy gap: rollout vs training log-probs and the importance weights, every step
        "reward_curve": [r.get("reward/mean") for r in steps],
        "logprob_max_abs_diff_max": max((r["rollout/logprob_max_abs_diff"] for r in steps
                                         if r.get("rollout/logprob_max_abs_diff") is not None),
                                        default=None),
        "logprob_mean_abs_diff": mean(r.get("rollout/logprob_mean_abs_diff") for r in steps),
        "is_weight_mean": mean(r.get("rollout/is_weight_mean") for r in steps),
        "is_weight_min": min((r["rollout/is_weight_min"] for r in steps
                              if r.get("rollout/is_weight_min") is not None), default=None),
        "is_weight_max": max((r["rollout/is_weight_max"] for r in steps
                              if r.get("rollout/is_weight_max") is not None), default=None),
    }
    return out


def fmt(x, spec="{:.3f}") -> str:
    return "n/a" if x is None else spec.format(x)


def print_table(s: dict, steps_requested: Optional[int], train_rc: Optional[int]) -> None:
    done = s["steps_done"]
    req = f"/{steps_requested}" if steps_requested else ""
    note = "" if not steps_requested or done >= steps_requested else "  (CUT SHORT)"
    print("================ GRPO SmolLM2-135M-Instruct summary")
    print(f"steps completed       {done}{req}{note}" +
          (f"   train rc={train_rc}" if train_rc is not None else ""))
    print(f"held-out accuracy     {fmt(s['eval_accuracy_before'])} -> {fmt(s['eval_accuracy_after'])}"
          f"   (greedy, {fmt(s['eval_prompts'], '{:.0f}')} prompts; before -> after {done} steps)")
    print(f"held-out reward       {fmt(s['eval_reward_before'])} -> {fmt(s['eval_reward_after'])}")
    print(f"train-batch reward    {fmt(s['train_reward_first_step'])} (step 1) -> "
          f"{fmt(s['train_reward_last5'])} (mean of last {min(5, done)} steps)")
    print(f"train-batch accuracy  {fmt(s['train_accuracy_first_step'])} (step 1) -> "
          f"{fmt(s['train_accuracy_last5'])}")
    split = s["time_split_s"]
    other = f", step(s) {s['other_steps_excluded']} excluded" if s["other_steps_excluded"] else ""
    print(f"step time (mean of {s['timed_steps']} steps, {s['warmup_steps_excluded']} warm-up excluded{other})")
    print("  " + " | ".join(f"{k} {fmt(v, '{:.3f}')} s" for k, v in split.items()) +
          f" | step {fmt(s['step_s'], '{:.3f}')} s | wall {fmt(s['wall_s_per_step'], '{:.3f}')} s")
    print(f"completion tokens     {fmt(s['completion_tokens_per_step'], '{:.0f}')} per step "
          f"(mean length {fmt(s['response_length_mean'], '{:.1f}')})")
    print(f"completion tokens/s   {fmt(s['completion_tokens_per_s'], '{:.0f}')} end-to-end "
          f"(aggregate {fmt(s['completion_tokens_per_s_aggregate'], '{:.0f}')}, "
          f"rollout only {fmt(s['rollout_tokens_per_s'], '{:.0f}')})")
    curve = s.get("reward_curve") or []
    print("reward per step       " + " ".join(fmt(r, "{:.2f}") for r in curve))
    print(f"rollout vs training   max |dlogp| {fmt(s.get('logprob_max_abs_diff_max'), '{:.3e}')}, "
          f"mean {fmt(s.get('logprob_mean_abs_diff'), '{:.3e}')}; importance weights mean "
          f"{fmt(s.get('is_weight_mean'), '{:.6f}')}, min {fmt(s.get('is_weight_min'), '{:.4f}')}, "
          f"max {fmt(s.get('is_weight_max'), '{:.4f}')}")
    print(f"vs TRL GRPOTrainer    {fmt(s['ratio_vs_trl'], '{:.2f}x')} of "
          f"{s['baseline_trl_tokens_per_s']:.0f} completion tokens/s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="metrics.jsonl of the run")
    p.add_argument("--steps", type=int, default=None, help="steps requested (to flag a cut-short run)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timings")
    p.add_argument("--baseline-tokens-per-s", type=float, default=1250.0,
                   help="TRL GRPOTrainer completion tokens/s on the same settings")
    p.add_argument("--train-rc", type=int, default=None)
    p.add_argument("--exclude-step", type=int, action="append", default=[],
                   help="leave this step out of the timings (e.g. logging.profile_step); repeatable")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    s = summarise(read_rows(a.metrics), a.warmup, a.baseline_tokens_per_s, exclude=a.exclude_step)
    s.update(steps_requested=a.steps, train_rc=a.train_rc,
             cut_short=bool(a.steps and s["steps_done"] < a.steps))
    print_table(s, a.steps, a.train_rc)
    line = json.dumps({"bench": "smollm2_grpo_vs_trl", **s})
    if a.json_out:
        try:
            with open(a.json_out, "w") as f:
                f.write(line + "\n")
        except OSError as exc:
            print(f"cannot write {a.json_out}: {exc}", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
