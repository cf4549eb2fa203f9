"""``reward_model``: a preference score from a judge model, for prompts no rule can grade (R1's
phase 4 "general" prompts). The judge runs through r1mega's own model stack (megatron GPTModel,
the packed forward-only schedule the reference model uses), on CPU, in the reward worker: no
network, no second framework.

The score is the judge's per-token probability of the completion given the prompt,
``exp(mean log p(completion token | prefix))``, in (0, 1]: a judge fine-tuned on preferred
responses (an SFT run on them) ranks completions like them higher. A classifier head would need
its own training loop; a judge log-prob reuses the SFT phase as the reward model's training.

The judge directory (``rewards.reward_model_dir``) holds ``judge.json`` (written by
:func:`write_judge`): the r1mega checkpoint to load (a ``step_XXXXXXXX`` directory the trainer or
a pipeline phase wrote), the model section it was trained with, and the tokenizer and template
of its prompts.

Each worker process builds the judge once, in a world of its own (one rank, gloo over a file
store): the trainer's process groups live in another process. The scorer therefore needs
``rewards.num_workers >= 1`` (config validation says so).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

from r1mega.rewards.registry import RewardResult, RewardSetupError, register_reward

JUDGE_FILE = "judge.json"
_JUDGES: dict = {}


def write_judge(directory: str, checkpoint: str, model_cfg, data_cfg) -> str:
    """Describe a trained r1mega checkpoint as a judge; returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, JUDGE_FILE), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint),
                   "model": dataclasses.asdict(model_cfg), "tokenizer": data_cfg.tokenizer,
                   "template": data_cfg.template, "max_prompt_tokens": data_cfg.max_prompt_tokens},
                  f, indent=1)
    return directory


def _private_world():
    """A one-rank megatron world in this (worker) process."""
    import torch.distributed as dist

    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import init_parallel

    if dist.is_initialized():
        raise RewardSetupError("reward_model runs its judge in a reward worker with a world of its "
                               "own; this process already has one. Set rewards.num_workers >= 1.")
    store = tempfile.NamedTemporaryFile(prefix="r1mega_judge_", delete=False).name
    os.unlink(store)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0,
                    launcher="single")
    return init_parallel(ParallelConfig(backend="gloo", distributed_optimizer=False),
                         PrecisionConfig(dtype="fp32"), env=env)


class Judge:
    def __init__(self, directory: str):
        from megatron.core import dist_checkpointing

        from r1mega.config import ModelConfig, PrecisionConfig
        from r1mega.data.tokenizer import load_tokenizer
        from r1mega.models.gpt import build_model
        from r1mega.train.checkpoint import model_sharded_state_dict
        from r1mega.train.grpo import token_logprob_fn

        path = os.path.join(directory, JUDGE_FILE)
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise RewardSetupError(f"rewards.reward_model_dir={directory}: cannot read {path} "
                                   f"({exc}); write it with r1mega.rewards.reward_model."
                                   "write_judge.") from None
        self.rt = _private_world()
        self.model_cfg = ModelConfig(**meta["model"])
        self.tok = load_tokenizer(meta["tokenizer"])
        self.template, self.max_prompt_tokens = meta["template"], int(meta["max_prompt_tokens"])
        self.chunks = build_model(self.model_cfg, self.rt, PrecisionConfig(dtype="fp32"), wrap=False)
        model_dir = meta["checkpoint"]
        if os.path.isdir(os.path.join(model_dir, "model")):
            model_dir = os.path.join(model_dir, "model")
        loaded = dist_checkpointing.load(model_sharded_state_dict(self.chunks), model_dir)
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
            chunk.requires_grad_(False)
        self.fn = token_logprob_fn(vocab_size=self.model_cfg.vocab_size, tp_group=None,
                                   temperature=1.0)

    def mean_logprob(self, prompt: str, completion: str) -> float:
        import torch

        from r1mega.data.templates import encode_prompt
        from r1mega.train.step import forward_only, sft_sample

        p = encode_prompt(prompt, self.template, self.tok, self.max_prompt_tokens)
        ids = p + self.tok.encode(completion) + [self.tok.eos_id]
        sample = sft_sample(torch.tensor(ids, dtype=torch.long), len(p))
        (lp,) = forward_only(self.chunks, self.rt, [sample], self.fn, micro_batch_tokens=len(ids))
        mask = sample["loss_mask"] > 0
        return float(lp[mask].mean())


def judge_for(directory: str) -> Judge:
    if directory not in _JUDGES:
        _JUDGES[directory] = Judge(directory)
    return _JUDGES[directory]


def _warmup() -> None:
    # The imports are most of a judge's start-up; the model itself is tiny next to them.
    import megatron.core  # noqa: F401 -- imported for its start-up cost only
    import r1mega.models.gpt  # noqa: F401 -- likewise


def _self_check(**context) -> None:
    directory = context.get("reward_model_dir")
    if not directory:
        raise RewardSetupError("reward_model: rewards.reward_model_dir is not set.")
    judge = judge_for(directory)
    if not math.isfinite(judge.mean_logprob("1+1=", "2")):
        raise RewardSetupError(f"reward_model: the judge in {directory} gives a non-finite "
                               "log-prob; its checkpoint is broken.")


@register_reward("reward_model", warmup=_warmup, self_check=_self_check)
def reward_model(completion: str, reference: dict, **context) -> RewardResult:
    directory = context.get("reward_model_dir")
    if not directory:
        raise RewardSetupError("reward_model: rewards.reward_model_dir is not set.")
    prompt = context.get("prompt") or reference.get("prompt") or ""
    if not completion:
        return RewardResult(0.0, ["empty completion"])
    lp = judge_for(directory).mean_logprob(prompt, completion)
    return RewardResult(math.exp(lp), [f"judge mean log-prob {lp:.3f} per token"])
