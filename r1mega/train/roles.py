"""The three roles of a GRPO run, as separate small objects over ONE set of policy weights.

* :class:`Policy`    — the trained model chunks (megatron DDP), the optimizer and LR schedule, and
  the update: forward/backward over token-budget micro-batches through the pipeline schedule, then
  a guarded optimizer step (a non-finite loss or gradient norm skips the update).
* :class:`Reference` — a frozen copy of the policy's weights at the start of RL, for the KL term.
  Only built when ``grpo.kl_beta > 0``; optionally parked in host memory between uses.
* :class:`Rollout`   — the generation engine over the policy's OWN modules (no copy, no refit):
  after an update the next ``generate`` reads the new weights in place.
"""
from __future__ import annotations

import contextlib

from typing import Callable, Optional, Sequence

import torch

from r1mega.models.gpt import build_model, unwrap
from r1mega.parallel.runtime import ParallelRuntime
from r1mega.train.optimizer import OptimizerBundle, build_optimizer
from r1mega.train.step import LossFn, StepResult, TrainStep, TokenFn, forward_only


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _maybe_compile(chunks: list, model_cfg) -> None:
    # Only layer.forward is compiled: the rollout engine calls the layers' submodules itself, so
    # generation over these same modules is untouched.
    if model_cfg.compile_layers:
        from r1mega.models.compile import compile_layers

        compile_layers(chunks)


def free_dropped_models(device: torch.device) -> None:
    """Frees models the caller has dropped, before the next one is built.

    A trained DDP model sits in reference cycles (megatron's backward hooks close over the DDP;
    trainers point back at their owners), so only the garbage collector frees it, and one pass
    is not always enough: a pass can free tensors whose owners only the next pass sees as
    garbage (on CPU, an fp32 model with the distributed optimizer needs two). Collecting until
    nothing is left, then returning the cached blocks, keeps two models from sharing a GPU.
    """
    import gc

    while gc.collect():
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Policy:
    """Model chunks + optimizer + schedule; ``update(samples, loss_fn)`` is one optimizer step."""

    def __init__(self, chunks: list, optim: OptimizerBundle, rt: ParallelRuntime, *,
                 micro_batch_tokens: int):
        self.chunks, self.optim, self.rt = chunks, optim, rt
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.step_fn = TrainStep(chunks, optim, rt, micro_batch_tokens=micro_batch_tokens)

    @classmethod
    def build(cls, model_cfg, precision_cfg, optimizer_cfg, rt: ParallelRuntime, *,
              distributed_optimizer: bool, micro_batch_tokens: int, total_steps: int) -> "Policy":
        chunks = build_model(model_cfg, rt, precision_cfg, wrap=True,
                             distributed_optimizer=distributed_optimizer)
        _maybe_compile(chunks, model_cfg)
        optim = build_optimizer(optimizer_cfg, chunks, rt, distributed=distributed_optimizer,
                                total_steps=total_steps)
        return cls(chunks, optim, rt, micro_batch_tokens=micro_batch_tokens)

    def modules(self) -> list:
        """The bare GPTModel of each chunk (what the rollout engine and the reference read)."""
        return [unwrap(c) for c in self.chunks]

    @property
    def lr(self) -> float:
        return self.optim.lr

    def forward_only(self, samples: Sequence[dict], fn: TokenFn) -> list:
        return forward_only(self.chunks, self.rt, samples, fn, self.micro_batch_tokens)

    def update(self, samples: Sequence[dict], loss_fn: LossFn) -> StepResult:
        """Forward/backward over every micro-batch of this rank's samples, then one step.

        A non-finite loss or global gradient norm leaves weights and Adam moments untouched
        (``update_successful=False``); the caller counts and reports it.
        """
        return self.step_fn(samples, loss_fn)


class Reference:
    """Frozen weights of the initial policy; forward-only log-probs through the pipeline schedule.

    Built with the policy's layout (same TP/PP shards), so copying is a per-rank state-dict copy
    with no communication. ``offload_enabled`` keeps the weights in host memory between calls:
    the reference runs once per step for a few seconds, the rest of the time its memory is better
    spent on the KV cache and activations.
    """

    def __init__(self, chunks: list, rt: ParallelRuntime, *, micro_batch_tokens: int,
                 offload_enabled: bool = False):
        self.chunks, self.rt = chunks, rt
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.offload_enabled = bool(offload_enabled) and rt.device.type != "cpu"
        if self.offload_enabled:
            self._move(torch.device("cpu"))

    @classmethod
    def from_policy(cls, policy: Policy, model_cfg, precision_cfg, *,
                    offload_enabled: bool = False) -> "Reference":
        chunks = build_model(model_cfg, policy.rt, precision_cfg, wrap=False)
        for ref, live in zip(chunks, policy.modules()):
            ref.load_state_dict(live.state_dict(), strict=True)
            ref.requires_grad_(False)
            ref.eval()
        _maybe_compile(chunks, model_cfg)
        return cls(chunks, policy.rt, micro_batch_tokens=policy.micro_batch_tokens,
                   offload_enabled=offload_enabled)

    def save(self, path: str) -> None:
        """The frozen weights as a dist checkpoint (written once, when RL starts), so that a
        resumed run keeps the reference it started with. Atomic: ``.tmp`` + rename."""
        import os
        import shutil

        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        from r1mega.train.checkpoint import model_sharded_state_dict

        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        tmp = path + ".tmp"
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(model_sharded_state_dict(self.chunks), tmp)
        _barrier()
        if rank0:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        _barrier()

    def load(self, path: str) -> None:
        from megatron.core import dist_checkpointing

        from r1mega.train.checkpoint import model_sharded_state_dict

        loaded = dist_checkpointing.load(model_sharded_state_dict(self.chunks), path)
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)

    def _move(self, device: torch.device) -> None:
        for chunk in self.chunks:
            for t in list(chunk.parameters()) + list(chunk.buffers()):
                t.data = t.data.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def logprobs(self, samples: Sequence[dict], fn: TokenFn) -> list:
        if self.offload_enabled:
            self._move(self.rt.device)
        try:
            return forward_only(self.chunks, self.rt, samples, fn, self.micro_batch_tokens)
        finally:
            if self.offload_enabled:
                self._move(torch.device("cpu"))


class Rollout:
    """Colocated generation from the policy's modules.

    The engine holds references to the policy's submodules, so there is nothing to synchronise
    after an update. ``generate`` frees the KV cache before returning, so the training phase gets
    that memory back (a cache under ``rollout.kv_keep_max_fraction`` of the device is kept, with
    its CUDA graphs, see ``RolloutEngine.end_phase``).

    The engine runs a whole model per rank (TP inside, no pipeline stages). Under pipeline
    parallelism this role falls back to :class:`PipelineGenerator`, which decodes by full
    recompute through the same pipeline schedule the training uses: slow, but the same weights
    and the same vocab-parallel sampler, so PP layouts can train at all.
    """

    def __init__(self, policy: Policy, rollout_cfg, rt: ParallelRuntime, *, eos_ids: list,
                 decode_fn: Callable, vocab_size: int, fp8_policy=None):
        self.cfg, self.rt = rollout_cfg, rt
        # precision.fp8_rollout: FP8 weight copies for the decode (r1mega/precision/rollout.py).
        self.fp8_weights = None
        if rt.pp_size == 1 and len(policy.chunks) == 1:
            from r1mega.rollout.engine import RolloutEngine

            self.engine = RolloutEngine(policy.chunks, rollout_cfg, rt, eos_ids=eos_ids,
                                        decode_fn=decode_fn, vocab_size=vocab_size)
            if fp8_policy is not None:
                from r1mega.precision.rollout import Fp8RolloutWeights

                self.fp8_weights = Fp8RolloutWeights(policy.chunks[0], fp8_policy)
        else:
            if fp8_policy is not None:
                raise ValueError("precision.fp8_rollout=true needs the rollout engine, which runs "
                                 "with parallel.pipeline=1 and parallel.virtual_stages=1; set "
                                 "precision.fp8_rollout=false for pipeline-parallel runs.")
            self.engine = PipelineGenerator(policy, rollout_cfg, rt, eos_ids=eos_ids,
                                            decode_fn=decode_fn, vocab_size=vocab_size)

    def generate(self, requests: list, on_finish: Optional[Callable[[list], None]] = None) -> list:
        """``on_finish(completions)``: called as completions finish (see RolloutEngine.generate)."""
        fp8 = self.fp8_weights.decoding() if self.fp8_weights is not None else contextlib.nullcontext()
        try:
            with fp8:
                return self.engine.generate(requests, on_finish=on_finish)
        finally:
            self.engine.end_phase()

    @property
    def stats(self) -> dict:
        return dict(getattr(self.engine, "stats", {}) or {})



class PipelineGenerator:
    """Sampling by full recompute through the training pipeline schedule (PP > 1 only).

    Every decode step runs the whole (prompt + generated) batch forward-only through the 1F1B
    schedule; the last stage samples the next token of each sequence from its last position with
    the engine's own counter-based vocab-parallel sampler (same seeds -> same tokens as the
    engine would draw from the same logits) and broadcasts tokens and log-probs to the other
    stages. Quadratic in length: meant for correctness of PP layouts, not speed. Stops at EOS or
    ``max_new_tokens`` (stop strings are not supported here).
    """

    def __init__(self, policy: Policy, rollout_cfg, rt: ParallelRuntime, *, eos_ids, decode_fn,
                 vocab_size: int):
        from r1mega.rollout.sampling import VocabShard, hashed_vocab_ids

        self.cfg, self.rt, self.policy = rollout_cfg, rt, policy
        self.eos_ids, self.decode_fn = set(int(e) for e in eos_ids), decode_fn
        last = policy.modules()[-1]
        local = (last.output_layer.weight.shape[0] if getattr(last, "output_layer", None) is not None
                 and last.output_layer.weight is not None
                 else last.shared_embedding_or_output_weight().shape[0]) if rt.is_last_stage else 0
        self.shard = VocabShard(rt.tp_rank * local, local, min(vocab_size, local * rt.tp_size),
                                rt.tp_group if rt.tp_size > 1 else None)
        self.vocab_hashed = hashed_vocab_ids(rt.tp_rank * local, local, rt.device) if local else None
        self.stats: dict = {}

    def end_phase(self) -> None:  # no KV cache to free
        pass

    def _params(self, req):
        c = self.cfg
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return (float(pick(req.temperature, c.temperature)), int(pick(req.top_k, c.top_k)),
                float(pick(req.top_p, c.top_p)), int(pick(req.max_new_tokens, c.max_new_tokens)))

    @torch.no_grad()
    def generate(self, requests: list, on_finish: Optional[Callable[[list], None]] = None) -> list:
        """Every request's completions; ``on_finish`` gets them all at once, at the end (each
        recompute step runs the whole batch, so nothing finishes earlier to hand over)."""
        import time

        import torch.distributed as dist

        from r1mega.rollout.sampling import SamplingBatch, sample, sequence_key, step_keys
        from r1mega.rollout.types import Completion
        from r1mega.train.step import _micro_batches, _schedule

        rt, t0 = self.rt, time.perf_counter()
        seqs = []
        for i, req in enumerate(requests):
            temp, top_k, top_p, max_new = self._params(req)
            for j in range(req.n):
                seqs.append({"prompt": [int(t) for t in req.prompt_ids], "tokens": [], "lps": [],
                             "pi": i, "si": j, "key": sequence_key(int(req.seed), j), "done": None,
                             "temp": temp, "top_k": top_k, "top_p": top_p, "max_new": max_new})
        dev = rt.device
        while True:
            active = [s for s in seqs if s["done"] is None]
            flag = torch.tensor([len(active)], dtype=torch.int64, device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank runs the same schedules
            if int(flag.item()) == 0:
                break
            samples = [{"input_ids": torch.tensor(s["prompt"] + s["tokens"], dtype=torch.long)}
                       for s in active]
            mbs = _micro_batches(samples, rt, self.policy.micro_batch_tokens, self.policy.chunks)
            out = torch.zeros(len(active), 2, dtype=torch.float64, device=dev)

            def on_logits(logits_shard, mb):
                ends = torch.cumsum(torch.tensor(mb.seq_lengths), 0) - 1
                rows = [(k, int(ends[p])) for p, k in enumerate(mb.sample_index) if k >= 0]
                if rows:
                    ss = [active[k] for k, _ in rows]
                    logits = logits_shard[torch.tensor([r for _, r in rows], device=dev)]
                    sb = SamplingBatch(
                        temperature=torch.tensor([s["temp"] for s in ss], device=dev),
                        top_k=torch.tensor([s["top_k"] for s in ss], device=dev),
                        top_p=torch.tensor([s["top_p"] for s in ss], device=dev),
                        keys=step_keys(torch.tensor([s["key"] for s in ss], device=dev),
                                       torch.tensor([len(s["tokens"]) for s in ss], device=dev)),
                        top_k_max=max(s["top_k"] for s in ss),
                        use_top_p=any(s["top_p"] < 1.0 for s in ss),
                        any_greedy=any(s["temp"] <= 0 for s in ss))
                    tok, lp, _ = sample(logits, sb, self.shard, self.vocab_hashed)
                    idx = torch.tensor([k for k, _ in rows], device=dev)
                    out[idx, 0] = tok.double()
                    out[idx, 1] = lp.double()
                return logits_shard.new_zeros(()), torch.zeros((), dtype=torch.int32, device=dev), {}

            for c in self.policy.chunks:
                c.eval()
            try:
                _schedule(self.policy.chunks, rt, mbs, on_logits, forward_only=True)
            finally:
                for c in self.policy.chunks:
                    c.train()
            dist.broadcast(out, src=rt.pp_last_rank, group=rt.pp_group)
            for s, (tok, lp) in zip(active, out.tolist()):
                s["tokens"].append(int(tok))
                s["lps"].append(lp)
                if int(tok) in self.eos_ids:
                    s["done"] = "stop"
                elif len(s["tokens"]) >= s["max_new"]:
                    s["done"] = "length"
        new = sum(len(s["tokens"]) for s in seqs)
        dt = time.perf_counter() - t0
        self.stats = {"seconds": dt, "new_tokens": new, "tokens_per_s": new / max(dt, 1e-9)}
        outs = [Completion(prompt_index=s["pi"], sample_index=s["si"], token_ids=s["tokens"],
                           logprobs=s["lps"], finish_reason=s["done"],
                           text=self.decode_fn(s["tokens"]) if self.decode_fn else None)
                for s in seqs]
        if on_finish is not None and outs:
            on_finish(outs)
        return outs
