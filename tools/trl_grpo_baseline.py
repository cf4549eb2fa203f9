"""TRL's GRPOTrainer on the same task, model and settings as an r1mega SmolLM2 run: the peer for
the completion-tokens/s ratio, measured in the same device call.

    python tools/trl_grpo_baseline.py HF_DIR [--steps 20] [--budget-s 150] [--operators +-]

Settings mirror configs/smollm2_grpo_gpu.yaml: 8 prompts x 8 completions per step, at most 125
new tokens, temperature 1, one update per batch, no KL, clip 0.2 / 0.28, the same chat prompt
(R1 system turn + the question) and the same reward (r1mega's math_accuracy + 0.1 x format,
called in-process). Generation is transformers' own (TRL's default without vLLM).
Prints a table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--operators", default="+-")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing")
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1mega.data.tasks.arithmetic import make_item
    from r1mega.data.templates import R1_SYSTEM
    from r1mega.rewards.format import check_format
    from r1mega.rewards.math import math_accuracy

    rng = random.Random(0)
    items = [make_item(rng, digits=2, operators=a.operators, terms=2, style="question")
             for _ in range(2000)]
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": R1_SYSTEM},
                                        {"role": "user", "content": r.prompt}],
                             "question": r.prompt, "answer": r.reference["answer"]}
                            for r in items])

    def reward(completions, question, answer, **_):
        out = []
        for c, q, gold in zip(completions, question, answer):
            text = c[-1]["content"] if isinstance(c, list) else c
            out.append(math_accuracy(text, {"answer": gold}, prompt=q).score
                       + 0.1 * check_format(text).score)
        return out

    step_ends, lengths = [], []
    t_start = [0.0]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            t_start[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.perf_counter())
            if step_ends[-1] - t_start[0] > a.budget_s:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.bfloat16).cuda()
    cfg = GRPOConfig(output_dir="/tmp/trl-grpo", per_device_train_batch_size=64, num_generations=8,
                     max_completion_length=125, temperature=1.0, learning_rate=a.lr, beta=0.0,
                     epsilon=0.2, epsilon_high=0.28, bf16=True, logging_steps=1,
                     max_steps=a.steps, report_to=[], save_strategy="no",
                     gradient_accumulation_steps=1, seed=0)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[reward], args=cfg,
                          train_dataset=ds, callbacks=[Clock()])
    trainer.train()

    times = [b - a_ for a_, b in zip([t_start[0]] + step_ends[:-1], step_ends)]
    n = min(len(times), len(lengths))
    keep = range(min(a.warmup_steps, max(n - 1, 0)), n)
    tokens = [64 * lengths[i] for i in keep]
    secs = [times[i] for i in keep]
    res = {"bench": "trl_grpo_baseline", "trl_version": __import__("trl").__version__,
           "steps_timed": len(secs), "median_step_s": statistics.median(secs) if secs else None,
           "mean_completion_tokens": statistics.mean(lengths[i] for i in keep) if secs else None,
           "completion_tokens_per_s": sum(tokens) / sum(secs) if secs else None,
           "per_step_mean_tokens_per_s": statistics.mean(t / s for t, s in zip(tokens, secs))
           if secs else None}
    print(f"TRL {res['trl_version']} GRPOTrainer: {res['steps_timed']} steps timed, median "
          f"{res['median_step_s']:.2f} s/step, {res['mean_completion_tokens']:.1f} tokens per "
          f"completion, {res['completion_tokens_per_s']:.0f} completion tokens/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
