"""Vocab-parallel sampling with a counter-based RNG, returning the sampled tokens' log-probs.

Sampling is Gumbel-max: ``argmax(z + g)`` with ``z = logits / T`` (truncated by top-k/top-p) and
``g = -log(-log(u))`` is an exact draw from ``softmax(z)``. The uniforms ``u`` come from a hash of
(sequence key, generation step, global vocabulary id), never from a stateful generator, so:

- a sequence's samples do not depend on which other sequences share its batch (continuous
  batching and one-at-a-time generation give the same tokens), nor on preemption/recompute;
- with tensor parallelism each rank draws the noise of its own vocabulary slice from the global
  ids, so TP=2 samples exactly what TP=1 samples, and the full vocabulary is never gathered:
  the ranks exchange a (max, index) pair and the log-sum-exp per row.
- it is plain tensor code without host synchronisation, so it can live inside a CUDA graph.

On CUDA the untruncated path (no top-k/top-p) runs as a fused Triton pass over the logits
(:mod:`r1mega.rollout.triton_sampling`); the PyTorch code here is its reference and the CPU path.

top-p needs the sorted distribution over the whole vocabulary; with TP > 1 (and only when some
row asks for top_p < 1) the logits are all-gathered for that threshold. R1-style RL samples at
temperature 1 without truncation, which takes the gather-free path.

Returned log-probs are of the distribution actually sampled from (temperature + truncation).
A greedy row (temperature 0) samples from a point mass; for it the log-prob returned is the
temperature-1 untruncated one, the only informative choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from r1mega.ops.batch_invariant import exact_active

_MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (or numpy int64 arrays: the same operators, the
    same values) holding values in [0, 2^32).

    The multipliers are below 2^31 so that no product leaves the int64 range: the result is the
    same on every device and backend (no reliance on wrap-around of signed overflow).
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    x = x ^ (x >> 16)
    return x


def _hash32_int(x: int) -> int:
    """:func:`hash32` on a Python int (host-side keys, no tensor round trip)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def sequence_key(seed: int, sample_index: int) -> int:
    """The RNG key of one completion: a function of the request seed and the sample's index."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    mixed = _hash32_int(hi + 0x3C6EF372) ^ _hash32_int((sample_index & _MASK32) * 0x2545F491 + 0x1B873593)
    return _hash32_int(lo ^ mixed)


def step_keys(seq_keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) int64 key per row for this generation step (step = number of tokens generated so far);
    torch tensors or numpy int64 arrays (the CUDA-graph step's keys are made on the host)."""
    return hash32(seq_keys ^ hash32(steps * 0x61C88647 + 0x7F4A7C15))


def gumbel_noise(keys: torch.Tensor, vocab_ids_hashed: torch.Tensor) -> torch.Tensor:
    """(B, V_local) float32 Gumbel(0,1) noise from row keys (B,) and hashed global vocab ids (V_local,)."""
    h = hash32(keys[:, None] ^ vocab_ids_hashed[None, :])  # (B, V_local)
    # 24 random bits, centred in their float32 cell. For h >> 8 = 2^24 - 1 the + 0.5 rounds up
    # to 2^24, u to 1 and g to +inf (a uniformly random token, NaN on -inf padding columns, once
    # per 2^24 columns): the clamp keeps u strictly inside (0, 1) and changes no other draw.
    u = (((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp(max=1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def hashed_vocab_ids(vocab_start: int, vocab_local: int, device) -> torch.Tensor:
    ids = torch.arange(vocab_start, vocab_start + vocab_local, dtype=torch.int64, device=device)
    return hash32(hash32(ids * 0x27D4EB2F + 0x165667B1))


def noisy_scores(z, keys, vocab_ids_hashed, greedy) -> torch.Tensor:
    """(B, V_local) z + Gumbel noise (no noise on greedy rows)."""
    noise = gumbel_noise(keys, vocab_ids_hashed)
    return z + torch.where(greedy[:, None], torch.zeros_like(noise), noise)


_COMPILED = {}


def _noisy_scores(on_gpu: bool):
    """On GPU the ~20 elementwise passes of the hash + Gumbel transform over (B, V) are one
    fused kernel through torch.compile (the integer hash is exact either way); eager elsewhere,
    or if compiling fails."""
    if not on_gpu:
        return noisy_scores
    if "fn" not in _COMPILED:
        fn = noisy_scores
        try:
            cand = torch.compile(noisy_scores, dynamic=True)
            z = torch.zeros(2, 8, device="cuda")
            keys = torch.tensor([1, 2], device="cuda")
            hv = hashed_vocab_ids(0, 8, "cuda")
            g = torch.tensor([False, True], device="cuda")
            if torch.equal(cand(z, keys, hv, g).isfinite(), noisy_scores(z, keys, hv, g).isfinite()):
                fn = cand
        except Exception:  # no compiler toolchain: stay eager
            fn = noisy_scores
        _COMPILED["fn"] = fn
    return _COMPILED["fn"]


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors, plus host flags that pick the code path."""

    temperature: torch.Tensor  # (B,) float32; 0 = greedy
    top_k: torch.Tensor  # (B,) int64; 0 = off
    top_p: torch.Tensor  # (B,) float32; 1 = off
    keys: torch.Tensor  # (B,) int64 per-row step keys (see step_keys)
    top_k_max: int = 0  # largest top_k of the batch (host int: sizes the top-k buffers)
    use_top_p: bool = False
    any_greedy: bool = False
    want_logprobs_t1: bool = False


@dataclass
class VocabShard:
    """Where this rank's logits columns sit in the global vocabulary."""

    start: int  # global id of column 0
    size: int  # columns on this rank (padded vocab / tp)
    true_vocab: int  # ids >= true_vocab are embedding padding: never sampled
    group: Optional[dist.ProcessGroup] = None  # the TP group (None: not sharded)

    @property
    def sharded(self) -> bool:
        return self.group is not None and dist.get_world_size(self.group) > 1


def _all_reduce(t: torch.Tensor, op, shard: VocabShard) -> torch.Tensor:
    if shard.sharded:
        dist.all_reduce(t, op=op, group=shard.group)
    return t


def _global_argmax(best_local: torch.Tensor, tok_local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """(B,) global token of the best score over all ranks, from each rank's (best, token):
    the lowest global id among ranks holding the max, so a tie between ranks is deterministic."""
    best = _all_reduce(best_local.clone(), dist.ReduceOp.MAX, shard)
    big = torch.full_like(tok_local, torch.iinfo(torch.int64).max)
    return _all_reduce(torch.where(best_local == best, tok_local, big), dist.ReduceOp.MIN, shard)


def _logsumexp(z: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """(B, V_local) -> (B,) log-sum-exp over the whole (sharded) vocabulary."""
    m = _all_reduce(z.amax(dim=-1).clone(), dist.ReduceOp.MAX, shard)  # (B,)
    # A row whose local slice is all -inf still gives exp(-inf - m) = 0, never NaN, as m is finite.
    s = _all_reduce(torch.exp(z - m[:, None]).sum(dim=-1), dist.ReduceOp.SUM, shard)
    return m + torch.log(s)


def _top_k_threshold(
    z: torch.Tensor, top_k: torch.Tensor, k_max: int, shard: VocabShard
) -> torch.Tensor:
    """(B,) the k-th largest value of each row over the whole vocabulary (-inf where k = 0)."""
    # Each rank's share of the global top-k is within its own local top-k: only k values per
    # row and rank travel, never the vocabulary.
    k_local = min(z.shape[-1], k_max)
    local = z.topk(k_local, dim=-1).values  # (B, k_local), descending
    if shard.sharded:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(shard.group))]
        dist.all_gather(parts, local.contiguous(), group=shard.group)
        local = torch.cat(parts, dim=-1).sort(dim=-1, descending=True).values
    idx = (top_k.clamp(min=1) - 1).clamp(max=local.shape[-1] - 1)
    kth = local.gather(-1, idx[:, None]).squeeze(-1)
    return torch.where(top_k > 0, kth, torch.full_like(kth, float("-inf")))


def _top_p_threshold(z: torch.Tensor, top_p: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """(B,) smallest kept value of the nucleus of each row (-inf where top_p >= 1)."""
    full = z
    if shard.sharded:
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size(shard.group))]
        dist.all_gather(parts, z.contiguous(), group=shard.group)
        full = torch.cat(parts, dim=-1)  # (B, V)
    sorted_z = full.sort(dim=-1, descending=True).values
    probs = torch.softmax(sorted_z, dim=-1)
    # Keep a token while the mass before it is below top_p: the first token is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < top_p[:, None]
    n_keep = keep.sum(dim=-1).clamp(min=1)  # (B,)
    thr = sorted_z.gather(-1, (n_keep - 1)[:, None]).squeeze(-1)
    return torch.where(top_p < 1.0, thr, torch.full_like(thr, float("-inf")))


def sample(
    logits: torch.Tensor, params: SamplingBatch, shard: VocabShard, vocab_ids_hashed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Sample one token per row from vocab-parallel logits.

    logits (B, V_local) in any float dtype. Returns (tokens (B,) int64 global ids,
    logprobs (B,) float32 under the sampled distribution, logprobs_t1 (B,) or None).
    On CUDA without top-k/top-p this runs the fused Triton kernel (R1MEGA_TRITON_SAMPLING=0
    forces the PyTorch code below, the reference).
    """
    if exact_active():
        return _sample_exact(logits, params, shard, vocab_ids_hashed)
    if _fused_eligible(logits, params):
        return _sample_fused(logits, params, shard, vocab_ids_hashed)
    return _sample_reference(logits, params, shard, vocab_ids_hashed)


def _sample_reference(logits, params: SamplingBatch, shard: VocabShard, vocab_ids_hashed):
    """:func:`sample` in plain PyTorch (the CPU path and the reference of the fused kernel)."""
    logits = logits.float()
    cols = torch.arange(shard.start, shard.start + shard.size, device=logits.device)
    pad = cols >= shard.true_vocab  # (V_local,)
    neg_inf = torch.full((), float("-inf"), device=logits.device)  # a fill, not a copy: graph-safe
    raw = torch.where(pad[None, :], neg_inf, logits)  # (B, V_local), T = 1, untruncated

    greedy = params.temperature <= 0  # (B,)
    temp = torch.where(greedy, torch.ones_like(params.temperature), params.temperature)
    z = raw / temp[:, None]
    if params.top_k_max > 0:
        thr = _top_k_threshold(z, params.top_k, params.top_k_max, shard)
        z = torch.where(z < thr[:, None], neg_inf, z)
    if params.use_top_p:
        z = torch.where(z < _top_p_threshold(z, params.top_p, shard)[:, None], neg_inf, z)

    # Eager under rollout.exact: a compiled function would have dynamo trace the exact mode.
    score = _noisy_scores(z.is_cuda and not exact_active())(z, params.keys, vocab_ids_hashed,
                                                             greedy)  # (B, V_local)
    best_local, idx_local = score.max(dim=-1)  # (B,)
    tok_local = idx_local + shard.start
    tokens = _global_argmax(best_local, tok_local, shard) if shard.sharded else tok_local

    def token_value(x: torch.Tensor) -> torch.Tensor:  # (B, V_local) -> (B,) x[b, tokens[b]]
        local = tokens - shard.start
        mine = (local >= 0) & (local < shard.size)
        v = x.gather(-1, local.clamp(0, shard.size - 1)[:, None]).squeeze(-1)
        v = torch.where(mine, v, torch.zeros_like(v))
        return _all_reduce(v, dist.ReduceOp.SUM, shard)

    lp_t1 = None
    if params.want_logprobs_t1 or params.any_greedy:
        lp_t1 = token_value(raw) - _logsumexp(raw, shard)
    logprobs = token_value(z) - _logsumexp(z, shard)
    if lp_t1 is not None:
        logprobs = torch.where(greedy, lp_t1, logprobs)
    return tokens, logprobs, (lp_t1 if params.want_logprobs_t1 else None)


def _sample_exact(logits, params: SamplingBatch, shard: VocabShard, vocab_ids_hashed):
    """``rollout.exact``: the tokens of the reference path, and their log-probs from the function
    the trainer recomputes them with (r1mega/ops/exact_logprobs.py), bit for bit. Untruncated:
    config validation refuses top-k/top-p with the exact mode. Only the log-probs must be the
    trainer's bits; the token is the reference's draw either way (the fused kernel's scores are
    the reference's but for a last-ulp log difference, which can flip only a near-tie), so on
    CUDA it comes from one read of the logits instead of a dozen vocabulary-wide kernels."""
    from r1mega.ops.exact_logprobs import exact_token_logprobs

    if _fused_eligible(logits, params):
        tokens = _sample_fused(logits, params, shard, vocab_ids_hashed)[0]
    else:
        tokens, _, _ = _sample_reference(logits, params, shard, vocab_ids_hashed)
    lp = exact_token_logprobs(logits, tokens, params.temperature, vocab_start=shard.start,
                              valid_cols=shard.true_vocab - shard.start, group=shard.group)
    lp_t1 = None
    if params.want_logprobs_t1:
        lp_t1 = exact_token_logprobs(logits, tokens, torch.ones_like(params.temperature),
                                     vocab_start=shard.start,
                                     valid_cols=shard.true_vocab - shard.start, group=shard.group)
    return tokens, lp, lp_t1


def _fused_eligible(logits: torch.Tensor, params: SamplingBatch) -> bool:
    """Whether the fused Triton kernel serves this call (CUDA, no top-k/top-p, not switched off)."""
    return logits.is_cuda and params.top_k_max == 0 and not params.use_top_p and _triton_enabled()


def _triton_enabled() -> bool:
    from r1mega.rollout import triton_sampling

    return triton_sampling.HAVE_TRITON and os.environ.get("R1MEGA_TRITON_SAMPLING", "1") != "0"


def _sample_fused(logits, params: SamplingBatch, shard: VocabShard, vocab_ids_hashed, block=None):
    """:func:`sample` without top-k/top-p through one read of the logits (triton_sampling);
    the vocab-parallel reductions are the reference's, on per-row partials. No truncation makes
    a greedy row's z its raw logits (T = 1), so its log-prob is already the temperature-1 one."""
    from r1mega.rollout.triton_sampling import fused_sample

    want_t1 = params.want_logprobs_t1
    r = fused_sample(logits, params.temperature, params.keys, vocab_ids_hashed, shard.start,
                     shard.true_vocab, want_t1, block=block)
    if not shard.sharded:
        return r.tokens, r.logprobs, (r.logprobs_t1 if want_t1 else None)
    tokens = _global_argmax(r.best, r.tokens, shard)
    mine = r.tokens == tokens  # only the rank holding the winner contributes its values

    def token_value(v):
        return _all_reduce(torch.where(mine, v, torch.zeros_like(v)), dist.ReduceOp.SUM, shard)

    def lse(m, s):
        m_all = _all_reduce(m.clone(), dist.ReduceOp.MAX, shard)
        return m_all + torch.log(_all_reduce(s * torch.exp(m - m_all), dist.ReduceOp.SUM, shard))

    logprobs = token_value(r.z_tok) - lse(r.m_z, r.s_z)
    lp_t1 = token_value(r.raw_tok) - lse(r.m_raw, r.s_raw) if want_t1 else None
    return tokens, logprobs, lp_t1
