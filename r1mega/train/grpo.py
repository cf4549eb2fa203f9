"""One GRPO step, in the order of the algorithm:

    prompts (this DP rank's slice) ──► G completions each (colocated engine; KV cache released)
        ──► rewards (rule-based scorer; each completion is scored while the longer ones still decode)
        ──► group advantages (optionally drop all-equal groups)
        ──► reference log-probs (frozen copy; only when grpo.kl_beta > 0)
        ──► old log-probs (only when the batch is reused: grpo.inner_epochs > 1)
        ──► policy update(s): packed micro-batches, pipeline schedule, fused GRPO loss
        ──► the next rollout reads the updated weights in place

Everything a completion needs in the loss travels as per-token fields of one packed sample
(``labels``, ``loss_mask``, ``advantages``, optional ``old_logprobs`` / ``ref_logprobs`` /
``rollout_logprobs``), so micro-batching never has to know what GRPO is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from r1mega.data.templates import encode_prompt
from r1mega.models.gpt import count_parameters
from r1mega.moe.replay import ROUTES_FIELD, routes_field
from r1mega.ops.grpo_loss import grpo_loss, local_normalizer_count
from r1mega.ops.logprobs import vocab_parallel_logprobs
from r1mega.rl.advantages import group_advantages
from r1mega.rl.logprob_check import LogprobCheck
from r1mega.rollout.types import GenerationRequest
from r1mega.train.profiling import prange
from r1mega.train.grpo_metrics import step_metrics
from r1mega.train.reward_errors import first_error
from r1mega.train.step import sft_sample

# ----------------------------------------------------------------------------- pure pieces


def request_seed(base: int, step: int, dp_rank: int, index: int) -> int:
    """Sampling seed of one prompt: distinct per (run seed, step, DP rank, prompt), identical on
    the TP ranks that share the prompt (they must draw the same tokens)."""
    return (((base * 1_000_003 + step) * 4_099 + dp_rank) * 65_537 + index) % (1 << 62)


def completion_sample(prompt_ids: Sequence[int], token_ids: Sequence[int], advantage: float,
                      rollout_logprobs: Optional[Sequence[float]] = None,
                      routes: Optional[torch.Tensor] = None) -> dict:
    """Prompt + completion as one training sequence; loss only on the completion's tokens.

    Position p predicts token p+1, so the completion (positions P..T-1) is predicted from
    positions P-1..T-2: exactly ``sft_sample``'s mask. ``routes`` (L_moe, n, k): the experts the
    rollout chose for the first n tokens (routing replay), as the ``moe_routes`` field.
    """
    tokens = torch.tensor(list(prompt_ids) + list(token_ids), dtype=torch.long)  # (T,)
    sample = sft_sample(tokens, len(prompt_ids))
    sample["advantages"] = torch.full((tokens.numel(),), float(advantage), dtype=torch.float32)
    if rollout_logprobs is not None:
        lp = torch.zeros(tokens.numel(), dtype=torch.float32)
        p = len(prompt_ids)
        lp[p - 1:p - 1 + len(token_ids)] = torch.tensor(list(rollout_logprobs), dtype=torch.float32)
        sample["rollout_logprobs"] = lp
    if routes is not None:
        sample[ROUTES_FIELD] = routes_field(routes, tokens.numel())
    return sample


def seq_ids_of(mb) -> torch.Tensor:
    """(T,) index of each packed token's sequence within the micro-batch.

    Built on the host from the host-side lengths and copied without blocking: a
    ``torch.tensor(..., device="cuda")`` is a blocking copy (a stream sync), and a device-side
    ``repeat_interleave`` without ``output_size`` reads the total back (another one)."""
    lengths = torch.tensor(mb.seq_lengths, dtype=torch.long)
    ids = torch.repeat_interleave(torch.arange(len(mb.seq_lengths)), lengths)
    return ids.to(mb.input_ids.device, non_blocking=True)


def samples_to_host(values: Sequence) -> list:
    """Per-sample device tensors -> host tensors through ONE device-to-host copy (``.cpu()`` on
    each would be one blocking copy per sample). ``None`` entries stay ``None``."""
    present = [v for v in values if v is not None]
    if not present:
        return list(values)
    flat = torch.cat([v.reshape(-1) for v in present]).cpu()
    pieces = iter(torch.split(flat, [v.numel() for v in present]))
    return [None if v is None else next(pieces).view(v.shape) for v in values]


def token_logprob_fn(*, vocab_size: int, tp_group, temperature: float, exact: bool = False):
    """``fn(logits_shard, mb) -> (T,)`` log p(label) at the sampling temperature (forward only).
    ``exact`` (rollout.exact): the sampler's own function, so the values match it bit for bit."""

    def fn(logits_shard, mb):
        labels = mb.fields["labels"] * (mb.fields["loss_mask"] > 0)
        if exact:
            return exact_shard_logprobs(logits_shard, labels, tp_group=tp_group,
                                        vocab_size=vocab_size, temperature=temperature)
        logp, _ = vocab_parallel_logprobs(logits_shard, labels, tp_group=tp_group,
                                          vocab_size=vocab_size, temperature=temperature)
        return logp

    return fn


def exact_shard_logprobs(logits_shard, labels, *, tp_group, vocab_size: int, temperature: float):
    """:func:`r1mega.ops.exact_logprobs.exact_token_logprobs` on a training vocabulary shard."""
    from r1mega.ops.exact_logprobs import exact_token_logprobs
    from r1mega.ops.logprobs import shard_columns, tp_rank_and_size

    rank, size = tp_rank_and_size(tp_group)
    start, valid = shard_columns(vocab_size, logits_shard.shape[1], rank, size)
    temp = torch.full((logits_shard.shape[0],), float(temperature), dtype=torch.float32,
                      device=logits_shard.device)
    return exact_token_logprobs(logits_shard.detach(), labels, temp, vocab_start=start,
                                valid_cols=valid, group=tp_group)


def grpo_loss_fn(grpo_cfg, *, vocab_size: int, tp_group, temperature: float, norm_tokens: int,
                 lp_check: Optional[LogprobCheck] = None):
    """The ``loss_fn(logits_shard, mb) -> (loss_sum, count, metric sums)`` of the train step.

    The GRPO loss is computed with ``normalizer=1`` and the step's schedule divides the summed
    gradient by the global sum of ``count``; ``count`` is this micro-batch's share of the
    aggregation's normaliser (tokens for token_mean, sequences for the seq-mean modes), so the
    result is the aggregate over ALL ranks and micro-batches, whatever the packing.
    ``lp_check`` sees the recomputed (or pinned old) log-probs next to the rollout's; with
    ``lp_check.exact`` the recomputation is the sampler's own function (rollout.exact).
    """
    exact = lp_check is not None and lp_check.exact

    def loss_fn(logits_shard, mb):
        f = mb.fields
        mask = f["loss_mask"]
        # Only the seq-mean aggregations look at sequences (token_mean weighs tokens alone).
        seq_ids = None if grpo_cfg.loss_agg == "token_mean" else seq_ids_of(mb)
        old = f.get("old_logprobs")
        if old is None:
            # On-policy, one update per batch: the policy that sampled these tokens is the one
            # being trained, so old == current and the ratio is exactly 1 (no clipping can act);
            # the forward-only "old" pass is skipped and the current log-probs stand in,
            # detached. Reading the logits once more is far cheaper than a model forward.
            with torch.no_grad():
                labels = f["labels"] * (mask > 0)
                if exact:
                    old = exact_shard_logprobs(logits_shard, labels, tp_group=tp_group,
                                               vocab_size=vocab_size, temperature=temperature)
                else:
                    # No range check (a device sync): grpo_loss below checks these labels.
                    old, _ = vocab_parallel_logprobs(logits_shard.detach(), labels,
                                                     tp_group=tp_group, vocab_size=vocab_size,
                                                     temperature=temperature, check_range=False)
        rollout_lp = f.get("rollout_logprobs")
        if lp_check is not None and rollout_lp is not None:
            lp_check.observe(old, rollout_lp, mask)
        loss, metrics = grpo_loss(
            logits_shard, f["labels"], f["advantages"], old, mask, cfg=grpo_cfg,
            tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
            ref_logp=f.get("ref_logprobs"),
            rollout_logp=rollout_lp if grpo_cfg.tis_cap else None,
            seq_ids=seq_ids, normalizer=1.0, impl=grpo_cfg.loss_impl)
        # An int32 device tensor, computed without a host read (a float() and a
        # torch.tensor(..., device=) back were two blocking syncs per micro-batch).
        count = local_normalizer_count(mask, loss_agg=grpo_cfg.loss_agg, seq_ids=seq_ids,
                                       num_seqs=len(mb.seq_lengths), norm_tokens=norm_tokens)
        sums = {k: v for k, v in metrics.items() if k.endswith("_sum") or k == "n_tokens"}
        return loss, count, sums

    return loss_fn


def reward_item(record, c) -> dict:
    """What the scorer needs about one completion of ``record``'s prompt."""
    return {"kind": record.kind, "completion": c.text, "reference": record.reference,
            "prompt": record.prompt, "truncated": c.finish_reason == "length",
            "num_tokens": len(c.token_ids)}


# ----------------------------------------------------------------------------- the step


@dataclass
class StepOutput:
    metrics: dict
    samples: list = field(default_factory=list)  # (prompt text, completion text, reward)
    # This rank's first reward error of the step (the loop shows it; see reward_errors.py).
    reward_error: Optional[str] = None


class GRPOStep:
    """Holds the roles and the per-step inputs; ``__call__(step)`` runs one GRPO step."""

    def __init__(self, cfg, rt, policy, rollout, scorer, sampler, tokenizer, reference=None):
        self.cfg, self.rt = cfg, rt
        self.policy, self.rollout, self.reference = policy, rollout, reference
        self.scorer, self.sampler, self.tok = scorer, sampler, tokenizer
        dp = rt.dp_size
        if cfg.data.global_batch_prompts % dp:
            raise ValueError(f"data.global_batch_prompts={cfg.data.global_batch_prompts} is not "
                             f"divisible by the data-parallel size {dp}.")
        self.prompts_per_rank = cfg.data.global_batch_prompts // dp
        if cfg.grpo.kl_beta and reference is None:
            raise ValueError("grpo.kl_beta > 0 needs a Reference role (the trainer builds one).")
        self.vocab_size = cfg.model.vocab_size
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        tp_group = rt.tp_group if rt.tp_size > 1 else None
        exact = bool(getattr(cfg.rollout, "exact", False))
        self.logprob_fn = token_logprob_fn(vocab_size=self.vocab_size, tp_group=tp_group,
                                           temperature=self.temperature, exact=exact)
        self.lp_check = LogprobCheck(exact)
        self.loss_fn = grpo_loss_fn(
            cfg.grpo, vocab_size=self.vocab_size, tp_group=tp_group, temperature=self.temperature,
            norm_tokens=cfg.grpo.loss_norm_tokens or cfg.rollout.max_new_tokens,
            lp_check=self.lp_check)
        self.num_params = count_parameters(cfg.model)

    def _sync(self):
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self, step: int) -> StepOutput:
        cfg, rt, G = self.cfg, self.rt, self.cfg.rollout.group_size
        t0 = self._sync()
        reward_counts = self.scorer.metrics()
        with prange("rollout"):
            # 1. prompts of this DP rank
            records = self.sampler.next_batch(self.prompts_per_rank)
            prompts = [encode_prompt(r.prompt, cfg.data.template, self.tok,
                                     cfg.data.max_prompt_tokens) for r in records]
            # 2. G completions each, from the current weights; the KV cache is freed on return
            requests = [GenerationRequest(p, n=G, seed=request_seed(cfg.rollout.seed, step,
                                                                    rt.dp_rank, i))
                        for i, p in enumerate(prompts)]
            # 3a. each completion goes to the reward pool as it finishes, so scoring overlaps
            # the decoding of the longer ones; the results equal scoring all of them afterwards.
            stream = self.scorer.stream()
            submitted: dict = {}  # (prompt, sample) -> submission index

            def score_soon(done: list) -> None:
                for c in done:
                    submitted[(c.prompt_index, c.sample_index)] = len(submitted)
                stream.submit([reward_item(records[c.prompt_index], c) for c in done])

            try:
                completions = self.rollout.generate(requests, on_finish=score_soon)
            except BaseException:
                stream.cancel()
                raise
            t_rollout = self._sync()
            rollout_stats = getattr(self.rollout, "stats", None)
        with prange("reward"):
            # 3b. rewards (what was not scored during the rollout) and group advantages
            score_soon([c for c in completions if (c.prompt_index, c.sample_index) not in submitted])
            streamed = stream.results()
            scored = [streamed[submitted[(c.prompt_index, c.sample_index)]] for c in completions]
            rewards = torch.tensor([s.total for s in scored], dtype=torch.float32)  # (N*G,)
            adv, equal = group_advantages(rewards, G, scale_by_std=cfg.grpo.scale_rewards)
            t_reward = self._sync()
        with prange("logprobs"):
            samples = self._build_samples(completions, prompts, adv, equal)
            # 4. reference and old log-probs (forward-only passes through the pipeline schedule)
            if self.reference is not None and cfg.grpo.kl_beta:
                lps = samples_to_host(self.reference.logprobs(samples, self.logprob_fn))
                for s, lp in zip(samples, lps):
                    s["ref_logprobs"] = lp
            if cfg.grpo.inner_epochs > 1:
                # The batch is reused, so the sampling policy must be pinned before the first
                # update.
                lps = samples_to_host(self.policy.forward_only(samples, self.logprob_fn))
                for s, lp in zip(samples, lps):
                    s["old_logprobs"] = lp
            t_logprobs = self._sync()
        with prange("train"):
            # 5. policy update(s); the first one's log-probs are checked against the rollout's
            self.lp_check.start_step()
            results = [self.policy.update(samples, self.loss_fn)
                       for _ in range(cfg.grpo.inner_epochs)]
            t_train = self._sync()
        with prange("metrics"):
            metrics = self._metrics(step, records, completions, scored, equal, samples, results,
                                    (t0, t_rollout, t_reward, t_logprobs, t_train), rollout_stats,
                                    reward_counts)
            return StepOutput(metrics, self._samples(records, completions, scored),
                              reward_error=first_error(scored))

    def _build_samples(self, completions, prompts, adv, equal) -> list:
        """One packed-ready sample per kept completion (see :func:`completion_sample`)."""
        cfg = self.cfg
        drop = cfg.grpo.drop_equal_groups
        keep = [i for i, c in enumerate(completions) if not (drop and bool(equal[c.prompt_index]))]
        if not keep:
            # Every group of this rank is uninformative; one sample with its loss mask zeroed
            # (below) keeps this rank in the (collective) schedule and contributes zero gradient.
            keep = [0]
        # Always carried: rollout/logprob_max_abs_diff compares them with the recomputed ones.
        use_rollout_lp = True
        adv_list = adv.tolist()  # one host list, not a float(adv[i]) per sample
        # Routing replay: completions carry their routes only when the rollout recorded them.
        samples = [completion_sample(prompts[completions[i].prompt_index], completions[i].token_ids,
                                     adv_list[i],
                                     completions[i].logprobs if use_rollout_lp else None,
                                     getattr(completions[i], "routes", None))
                   for i in keep]
        if drop and len(keep) == 1 and bool(equal[completions[0].prompt_index]):
            samples[0]["loss_mask"].zero_()
        return samples

    def _metrics(self, step, records, completions, scored, equal, samples, results, times,
                 rollout_stats: Optional[dict] = None, reward_counts: Optional[dict] = None
                 ) -> dict:
        out = step_metrics(self.cfg, self.rt, records, completions, scored, equal, samples,
                           results, times, rollout_stats=rollout_stats,
                           reward_counts=reward_counts, scorer_counts=self.scorer.metrics(),
                           num_params=self.num_params)
        out["rollout/logprob_max_abs_diff"] = self.lp_check.finish_step(
            self.rt.dp_group if self.rt.dp_size > 1 else None, self.rt.device)
        out.update({f"rollout/{k}": v for k, v in self.lp_check.stats.items()})
        return out

    def _samples(self, records, completions, scored) -> list:
        """The top-rewarded completions of the step, for tensorboard's text tab: a rising reward
        is believed only after reading what it pays for."""
        n = max(0, int(self.cfg.logging.num_samples))
        order = sorted(range(len(completions)), key=lambda i: -scored[i].total)[:n]
        return [(records[completions[i].prompt_index].prompt, completions[i].text or "",
                 scored[i].total) for i in order]
