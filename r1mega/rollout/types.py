"""What the trainer hands the rollout engine, and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class GenerationRequest:
    """One prompt, sampled ``n`` times (the GRPO group). ``None`` fields take ``cfg.rollout``'s."""

    prompt_ids: list
    n: int = 1
    seed: int = 0
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: Optional[list] = None


@dataclass
class Completion:
    """One sample of one prompt.

    ``token_ids`` are the generated tokens only (the prompt is not repeated); an EOS token that
    ended the sample is included, as are the tokens that completed a stop string, so that the
    trainer scores exactly what was sampled. ``logprobs[i]`` is the log-prob of ``token_ids[i]``
    under the distribution it was sampled from; ``logprobs_t1`` (when asked for) is the same at
    temperature 1 without top-k/top-p. ``finish_reason``: "stop" (EOS or a stop string) or
    "length" (max_new_tokens or the model's maximum sequence length). ``text`` is the decoded
    completion when a decode function was given, cut right after a stop string.
    """

    prompt_index: int
    sample_index: int
    token_ids: list
    logprobs: list
    finish_reason: str
    logprobs_t1: Optional[list] = None
    text: Optional[str] = None
    stop_reason: Optional[object] = None  # the EOS id or stop string that ended the sample
    # rollout.routing_replay: (L_moe, prompt_len + len(token_ids) - 1, k) int32 experts each MoE
    # layer chose for every token fed through the model (the last sampled token never was).
    routes: Optional[object] = None
