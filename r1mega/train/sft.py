"""Supervised fine-tuning on prompt + response pairs, loss on the response tokens only.

This is R1's cold start (a little supervised reasoning in the target format before RL) and, with
a teacher's outputs as responses, distillation. It runs on the same model, parallel layout,
optimizer and checkpoint stack as GRPO: only the samples and the loss function differ.

Sources (``train.sft_source``, else ``data.source``):
* a JSONL or Parquet file of rows ``{"prompt": ..., "response": ...}`` (``completion`` is accepted
  for ``response``); the prompt goes through ``data.template`` exactly as in GRPO, so the model
  is trained on the very prefix it will later be sampled from;
* ``builtin:arithmetic``: procedural prompts with worked R1-format solutions
  (``<think>23+58=81</think><answer>81</answer>``), the CPU demo's cold start.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import torch

from r1mega.data.datasets import BadRowError, read_rows
from r1mega.data.templates import encode_prompt
from r1mega.train.step import check_label_ids, sft_loss_fn, sft_sample


class SFTDataError(ValueError):
    pass


# ----------------------------------------------------------------------------- sources


def _eval_int(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b  # the task draws exact divisions only


def worked_arithmetic(expression: str) -> tuple[str, str]:
    """(reasoning, answer) for ``23+58*2``: one line per operation, ``*``/``/`` before ``+``/``-``,
    each left to right (the precedence the task's answers use)."""
    toks = re.findall(r"\d+|[+\-*/]", expression)
    if not toks or len(toks) % 2 == 0:
        raise SFTDataError(f"cannot read arithmetic expression {expression!r}")
    nums, ops = [int(t) for t in toks[0::2]], toks[1::2]
    steps = []
    for level in ("*/", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in level:
                value = _eval_int(nums[i], ops[i], nums[i + 1])
                steps.append(f"{nums[i]}{ops[i]}{nums[i + 1]}={value}")
                nums[i:i + 2] = [value]
                del ops[i]
            else:
                i += 1
    return ",".join(steps) or str(nums[0]), str(nums[0])


def r1_response(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


class BuiltinSFTSource:
    """Worked solutions for a procedural task (only ``arithmetic`` has them)."""

    def __init__(self, prompt_source):
        if getattr(prompt_source, "name", None) != "arithmetic":
            raise SFTDataError(
                f"no worked solutions for builtin:{getattr(prompt_source, 'name', '?')}; give "
                "train.sft_source a JSONL/Parquet file of {\"prompt\", \"response\"} rows.")
        self.prompts = prompt_source

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> tuple[str, str]:
        rec = self.prompts[i]
        reasoning, answer = worked_arithmetic(rec.metadata["expression"])
        if answer != str(rec.reference["answer"]):
            raise SFTDataError(f"worked solution of {rec.prompt!r} gives {answer}, the task says "
                               f"{rec.reference['answer']}; the precedence rules disagree.")
        return rec.prompt, r1_response(reasoning, answer)


def load_sft_file(path: str, on_bad_row: str = "error", stats: dict | None = None) -> list:
    if not os.path.exists(path):
        raise SFTDataError(f"SFT data file '{path}' does not exist (train.sft_source).")
    pairs, bad = [], 0
    for where, row in read_rows(path, key="train.sft_source"):
        if isinstance(row, BadRowError):  # not JSON at all
            if on_bad_row == "skip":
                bad += 1
                continue
            raise SFTDataError(f"{row} Fix the row or set data.on_bad_row=skip.")
        prompt = row.get("prompt") if isinstance(row, dict) else None
        response = (row.get("response", row.get("completion")) if isinstance(row, dict) else None)
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(response, str)
                and response.strip()):
            if on_bad_row == "skip":
                bad += 1
                continue
            raise SFTDataError(f"{where}: an SFT row needs non-empty string 'prompt' and "
                               f"'response' fields; got keys {sorted(row) if isinstance(row, dict) else type(row).__name__}. "
                               "Fix the row or set data.on_bad_row=skip.")
        pairs.append((prompt, response))
    if stats is not None:
        stats["bad_rows"] = bad
    if not pairs:
        raise SFTDataError(f"SFT data file '{path}' has no usable rows.")
    return pairs


def build_sft_source(train_cfg, data_cfg):
    """Indexable (prompt, response) pairs for ``r1mega sft`` and the cold start."""
    spec = train_cfg.sft_source or data_cfg.source
    if spec.startswith("builtin:"):
        from r1mega.data.source import build_prompt_source

        return BuiltinSFTSource(build_prompt_source(data_cfg))
    if spec.startswith("reasoning_gym:"):
        raise SFTDataError(f"train.sft_source={spec!r}: reasoning-gym tasks ship no worked "
                           "solutions; use a JSONL/Parquet file of prompt/response rows.")
    return load_sft_file(spec, data_cfg.on_bad_row)


# ----------------------------------------------------------------------------- samples + step


def encode_pair(prompt: str, response: str, data_cfg, tokenizer, max_tokens: int) -> dict:
    """Prompt (through the template, as GRPO renders it) + response + EOS -> one SFT sample."""
    p = encode_prompt(prompt, data_cfg.template, tokenizer, data_cfg.max_prompt_tokens)
    r = tokenizer.encode(response) + [tokenizer.eos_id]
    ids = p + r
    if len(ids) > max_tokens:
        raise SFTDataError(f"SFT example of {len(ids)} tokens (prompt {prompt[:40]!r}) is over "
                           f"data.micro_batch_tokens={max_tokens}; raise it or filter the data.")
    return sft_sample(torch.tensor(ids, dtype=torch.long), len(p))


class SFTStep:
    """One optimizer step on ``train.sft_batch_examples`` examples (over all DP ranks).

    The order is a seeded permutation per epoch, walked by the same :class:`PromptSampler`
    cursor as GRPO prompts, so SFT resumes exactly too.
    """

    def __init__(self, cfg, rt, policy, tokenizer, source):
        from r1mega.data.sampler import PromptSampler

        self.cfg, self.rt, self.policy, self.tok, self.source = cfg, rt, policy, tokenizer, source
        batch = cfg.train.sft_batch_examples
        if batch % rt.dp_size:
            raise ValueError(f"train.sft_batch_examples={batch} is not divisible by the "
                             f"data-parallel size {rt.dp_size}.")
        self.per_rank = batch // rt.dp_size
        self.sampler = PromptSampler(source, rt.dp_rank, rt.dp_size, seed=cfg.data.seed + 17)
        tp_group = rt.tp_group if rt.tp_size > 1 else None
        self.loss_fn = sft_loss_fn(cfg.model.vocab_size, tp_group, host_checked=True,
                                   mtp_weight=cfg.model.mtp_loss_weight if cfg.model.mtp_num_layers else 0.0)

    def __call__(self, step: int) -> dict:
        import time

        t0 = time.perf_counter()
        pairs = self.sampler.next_batch(self.per_rank)
        samples = [encode_pair(p, r, self.cfg.data, self.tok, self.cfg.data.micro_batch_tokens)
                   for p, r in pairs]
        check_label_ids(samples, self.cfg.model.vocab_size)
        res = self.policy.update(samples, self.loss_fn)
        dt = time.perf_counter() - t0
        return {"sft/loss": res.loss, "loss": res.loss, "lr": res.lr,
                "grad_norm": float("nan") if res.grad_norm is None else res.grad_norm,
                "update_skipped": float(not res.update_successful),
                "train/tokens": float(res.num_tokens), "time/step_s": dt,
                "throughput/tokens_per_s": res.num_tokens / max(dt, 1e-9)}


def response_token_count(samples: Sequence[dict]) -> int:
    return int(sum(float(s["loss_mask"].sum()) for s in samples))
