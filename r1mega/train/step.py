"""One optimizer step (and forward-only passes) through megatron's pipeline schedules.

    samples ──► make_micro_batches (token budget, same count on every DP rank)
            ──► get_forward_backward_func (no pipelining | 1F1B | interleaved 1F1B)
                   each micro-batch: model(packed THD) -> logits (T, V/tp) -> loss_fn
            ──► finalize_model_grads: DP reduce(-scatter), TP norm grads, tied embeddings,
                and the 1 / (global token count) scale
            ──► optimizer step (clip, distributed optimizer, lr schedule)
            ──► MoE expert-bias step from the step's training loads (when enabled)

The loss is pluggable: ``loss_fn(logits_shard, micro_batch) -> (loss_sum, num_tokens, metrics)``.
``loss_sum`` is a SUM over this micro-batch's tokens and ``num_tokens`` the count it is normalised
by; megatron (``calculate_per_token_loss``) divides the gradient by the count summed over all
micro-batches and DP ranks, so the step minimises ``sum(loss_sum) / sum(num_tokens)`` globally,
whatever the packing. ``metrics`` are 0-d tensors, summed over micro-batches and DP ranks.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from r1mega.models.gpt import unwrap
from r1mega.moe.balancing import moe_layers, update_expert_biases
from r1mega.moe.replay import ROUTES_FIELD, micro_batch_replay
from r1mega.ops.logprobs import vocab_parallel_logprobs
from r1mega.parallel.runtime import ParallelRuntime
from r1mega.precision.linear import new_weight_generation
from r1mega.precision.policy import te_fp8_token_multiple
from r1mega.train.device_step import (DeferredGradScale, Readback, device_optimizer_step,
                                      folds_token_scale, sync_free_supported)
from r1mega.train.failures import guarded_optimizer_step
from r1mega.train.batching import MicroBatch, make_micro_batches, unpack_per_sample
from r1mega.train.optimizer import OptimizerBundle
from r1mega.train.profiling import prange

LossFn = Callable[[torch.Tensor, MicroBatch], tuple]
TokenFn = Callable[[torch.Tensor, MicroBatch], torch.Tensor]


# ----------------------------------------------------------------------------- SFT loss


def vocab_parallel_target_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, *,
                                   vocab_size: int, tp_group=None, check_range: bool = True) -> torch.Tensor:
    """log p(target) (T,) from this rank's vocabulary shard (T, V/tp), identical on all TP ranks;
    columns >= vocab_size are padding. The GRPO objective's op: the fused kernel on GPU, a
    token-chunked fp32 path elsewhere, never a (T, V) float32 copy of the logits."""
    logp, _ = vocab_parallel_logprobs(logits_shard, targets, tp_group=tp_group, vocab_size=vocab_size,
                                      check_range=check_range)
    return logp


def check_label_ids(samples: Sequence[dict], vocab_size: int) -> None:
    """Host-side range check of the samples' labels (CPU tensors, no device sync); a loss built
    with ``sft_loss_fn(..., host_checked=True)`` relies on it."""
    for i, s in enumerate(samples):
        labels = s["labels"][s["loss_mask"] > 0]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab_size):
            raise ValueError(f"sample {i}: label ids in [{int(labels.min())}, {int(labels.max())}] are "
                             f"outside the model's vocabulary [0, {vocab_size}): the tokenizer does "
                             "not match model.vocab_size")


def sft_loss_fn(vocab_size: int, tp_group=None, *, host_checked: bool = False,
                mtp_weight: float = 0.0) -> LossFn:
    """Cross-entropy on micro-batch fields ``labels`` (T,) and ``loss_mask`` (T,).
    ``host_checked``: the caller ran :func:`check_label_ids`, so no device range check (a sync).
    ``mtp_weight`` > 0: the model's multi-token-prediction depths train on the same tokens
    (``loss_fn.mtp_loss``, added by the schedule; r1mega/models/deepseek_v3/mtp.py)."""

    def target_logprobs(logits_shard, labels):
        return vocab_parallel_target_logprobs(logits_shard, labels, vocab_size=vocab_size,
                                              tp_group=tp_group, check_range=not host_checked)

    def loss_fn(logits_shard, mb: MicroBatch):
        labels, mask = mb.fields["labels"], mb.fields["loss_mask"].float()
        logp = target_logprobs(logits_shard, labels * (mask > 0))
        nll_sum = -(logp * mask).sum()
        return nll_sum, mask.sum().to(torch.int32), {"nll_sum": nll_sum.detach()}

    def mtp_loss(mtp_logits, mb: MicroBatch):
        from r1mega.models.deepseek_v3.mtp import mtp_loss_sum

        lengths = torch.tensor(mb.seq_lengths, device=mb.fields["labels"].device)
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        return mtp_loss_sum(mtp_logits, mb.fields["labels"], mb.fields["loss_mask"], seq_ids,
                            mtp_weight, target_logprobs)

    if mtp_weight > 0:
        loss_fn.mtp_loss = mtp_loss
    return loss_fn


def sft_sample(tokens: torch.Tensor, prompt_tokens: int = 0) -> dict:
    """input_ids/labels/loss_mask for next-token prediction; prompt tokens are not trained."""
    tokens = tokens.long()
    labels = torch.zeros_like(tokens)
    labels[:-1] = tokens[1:]
    mask = torch.zeros(tokens.numel(), dtype=torch.float32)
    mask[max(prompt_tokens - 1, 0): tokens.numel() - 1] = 1.0
    return {"input_ids": tokens, "labels": labels, "loss_mask": mask}


# ----------------------------------------------------------------------------- schedule


def _layout(mb: MicroBatch, rt: ParallelRuntime, batch_equal_lengths: bool) -> tuple[int, int]:
    """(sequence, batch) dims megatron sees: (S, B) for B equal-length sequences, else (T, 1)."""
    lengths = mb.seq_lengths
    if (batch_equal_lengths and len(lengths) > 1 and len(set(lengths)) == 1
            # the interleaved schedule at PP=2 needs one fixed shape (see _micro_batches)
            and rt.vp_size == 1
            # sequence parallelism splits the (S, B) layout along S
            and (not rt.sequence_parallel or lengths[0] % rt.tp_size == 0)):
        return lengths[0], len(lengths)
    return mb.num_tokens, 1


def _schedule(model_chunks: list, rt: ParallelRuntime, micro_batches: Sequence[MicroBatch],
              on_logits: Callable, forward_only: bool, batch_equal_lengths: bool = True):
    """Run megatron's schedule; ``on_logits(logits_shard, mb)`` -> (loss, n_tokens, dict).

    ``batch_equal_lengths``: a micro-batch of B sequences of one length S runs as a plain (B, S)
    batch instead of THD: megatron's THD RoPE reads cu_seqlens back to the host in every layer
    and splits per sequence, the batched path does neither. Token order is the same either way.
    """
    fwd_bwd = get_forward_backward_func(pp_size=rt.pp_size,
                                        vp_size=rt.vp_size if rt.vp_size > 1 else None)
    # Weights may have changed since the last pass: FP8 layers re-quantise them once, here.
    new_weight_generation()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        seq, batch = _layout(mb, rt, batch_equal_lengths)
        # MoE balance losses of this micro-batch's forward (None for dense models and for
        # forward-only passes, which record nothing: see r1mega/moe/balancing.py).
        collector = getattr(unwrap(model), "moe_aux_losses", None)
        if collector is not None:
            collector.begin()
        # Multi-token prediction runs only for losses that train it (SFT), never in log-prob passes.
        mtp, mtp_loss = getattr(unwrap(model), "mtp_heads", None), getattr(on_logits, "mtp_loss", None)
        if mtp is not None:
            mtp.active = mtp_loss is not None and not forward_only
        # Routing replay: the MoE layers route this micro-batch as the rollout did (its
        # moe_routes field; see r1mega/moe/replay.py). Sequence parallelism splits S over TP.
        sp = rt.sequence_parallel and rt.tp_size > 1
        replay = micro_batch_replay(model, mb.fields.get(ROUTES_FIELD), seq, batch,
                                    rt.tp_rank if sp else 0, rt.tp_size if sp else 1)
        with prange("model_forward"), replay:
            if batch > 1:
                ids = mb.input_ids.view(batch, seq)  # (B, S)
                out = model(input_ids=ids, position_ids=None, attention_mask=None)
            else:
                out = model(input_ids=mb.input_ids, position_ids=None, attention_mask=None,
                            packed_seq_params=mb.packed)

        aux = collector.take() if collector is not None else None
        mtp_logits = mtp.take() if mtp is not None else None

        def loss_func(output):
            # (1, T, V/tp) or (B, S, V/tp) -> (T, V/tp), sequences end to end as packed
            with prange("loss"):
                loss_sum, num_tokens, metrics = on_logits(output.reshape(-1, output.shape[-1]), mb)
            if aux is not None:
                # loss_sum is a sum normalised by the global sum of num_tokens, so the balance
                # loss enters as the count-weighted mean of its per-micro-batch values. Added
                # after on_logits: the reported loss stays the task loss alone.
                loss_sum = loss_sum + aux * num_tokens
            if mtp_logits:
                loss_sum = loss_sum + mtp_loss(mtp_logits, mb)
            return loss_sum, num_tokens, metrics

        return out, loss_func

    # Pipeline stages exchange (seq, batch, hidden) activations. One shape for every micro-batch
    # is announced up front; otherwise megatron exchanges each shape before each transfer. Fixed
    # shapes also avoid megatron's PP=2 interleaved shape bug (see _micro_batches).
    layouts = {_layout(mb, rt, batch_equal_lengths) for mb in micro_batches}
    fixed = len(layouts) == 1
    seq_length, micro_batch_size = next(iter(layouts)) if fixed else (
        max(mb.num_tokens for mb in micro_batches), 1)
    unwrap(model_chunks[0]).config.variable_seq_lengths = not fixed
    iters = [iter(micro_batches) for _ in model_chunks]
    return fwd_bwd(
        forward_step_func=forward_step,
        data_iterator=iters if len(model_chunks) > 1 else iters[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _micro_batches(samples, rt: ParallelRuntime, micro_batch_tokens: int,
                   model_chunks: Sequence = ()) -> list[MicroBatch]:
    with prange("micro_batches"):
        return _make_micro_batches(samples, rt, micro_batch_tokens, model_chunks)


def _make_micro_batches(samples, rt: ParallelRuntime, micro_batch_tokens: int,
                        model_chunks: Sequence = ()) -> list[MicroBatch]:
    interleaved = rt.vp_size > 1
    # Transformer Engine's FP8 GEMMs take whole multiples of tokens on each rank (16, or the
    # recipe's block); 1 for every other model
    te = te_fp8_token_multiple(unwrap(model_chunks[0]).config) if model_chunks else 1
    return make_micro_batches(
        samples, micro_batch_tokens, dp_group=rt.dp_group, device=rt.device,
        pad_to_multiple=(rt.tp_size if rt.sequence_parallel else 1) * te,
        # The interleaved schedule needs a multiple of PP micro-batches.
        count_multiple=rt.pp_size if interleaved else 1,
        # megatron 0.16.1 exchanges variable shapes on one group in the order [send_prev,
        # recv_prev, send_next, recv_next]; at PP=2 prev and next are the same rank, so when the
        # interleaved schedule sends both ways at once the shapes cross (forward receives the
        # backward's shape). Fixed-size micro-batches need no shape exchange at all.
        fixed_size=interleaved,
    )


def forward_only(model_chunks: list, rt: ParallelRuntime, samples: Sequence[dict],
                 fn: TokenFn, micro_batch_tokens: int, *, broadcast: bool = True) -> list:
    """Per-token outputs of ``fn(logits_shard, mb) -> (T,) float32`` for each sample.

    Used for old-policy / reference log-probs. The values are computed on the last pipeline stage;
    with ``broadcast`` every rank of the pipeline gets them (else other stages get None).
    Returns one (n_i,) tensor per sample, in the order of ``samples``.
    """
    mbs = _micro_batches(samples, rt, micro_batch_tokens, model_chunks)
    values: list[torch.Tensor] = []
    zero_tokens = torch.zeros((), dtype=torch.int32, device=rt.device)

    def on_logits(logits_shard, mb):
        v = fn(logits_shard, mb)
        if tuple(v.shape) != (mb.num_tokens,):
            raise ValueError(f"forward_only fn returned shape {tuple(v.shape)}; expected "
                             f"({mb.num_tokens},), one value per packed token.")
        values.append(v.detach().float())
        return logits_shard.new_zeros(()), zero_tokens, {}

    was_training = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()
    try:
        with torch.no_grad():
            _schedule(model_chunks, rt, mbs, on_logits, forward_only=True)
    finally:
        for c, t in zip(model_chunks, was_training):
            c.train(t)
    if rt.pp_size > 1 and broadcast:
        flat = torch.cat(values) if rt.is_last_stage else torch.empty(
            sum(mb.num_tokens for mb in mbs), dtype=torch.float32, device=rt.device)
        dist.broadcast(flat, src=rt.pp_last_rank, group=rt.pp_group)
        values = list(torch.split(flat, [mb.num_tokens for mb in mbs]))
    elif not rt.is_last_stage:
        return [None] * len(samples)
    return unpack_per_sample(values, mbs, len(samples))


class StepResult:
    """What one optimizer step did. On the sync-free path (see device_step.py) the scalars live
    on the device until first read: reading ``loss``, ``grad_norm`` ... waits for that step's
    results only, never for work queued after it."""

    def __init__(self, *, lr: float, num_micro_batches: int, loss: float = float("nan"),
                 num_tokens: int = 0, grad_norm: Optional[float] = None,
                 update_successful: bool = False, metrics_sum: Optional[dict] = None,
                 readback=None, metric_keys: Sequence[str] = ()):
        self.lr, self.num_micro_batches = lr, num_micro_batches
        self._loss, self._num_tokens, self._grad_norm = loss, num_tokens, grad_norm
        self._ok, self._metrics = update_successful, dict(metrics_sum or {})
        self._readback, self._keys = readback, tuple(metric_keys)

    def _resolve(self) -> None:
        if self._readback is None:
            return
        ok, norm, tokens, loss, *rest = self._readback.get()
        self._readback = None
        self._ok, self._grad_norm = bool(ok), float(norm)
        self._num_tokens, self._loss = int(tokens), float(loss)
        self._metrics = dict(zip(self._keys, rest))

    loss = property(lambda self: self._read("_loss"))  # global sum(loss_sum) / sum(num_tokens)
    num_tokens = property(lambda self: self._read("_num_tokens"))  # global (all DP ranks)
    grad_norm = property(lambda self: self._read("_grad_norm"))
    update_successful = property(lambda self: self._read("_ok"))
    metrics_sum = property(lambda self: self._read("_metrics"))  # global sums of loss_fn metrics

    def _read(self, name: str):
        self._resolve()
        return getattr(self, name)


class MetricSums:
    """Float64 sums over micro-batches of the loss function's 0-d metrics, on the device.

    Each micro-batch's values go in as ONE vector (a stack per dtype, then one conversion), and
    one add accumulates it: ~6 small kernels per micro-batch instead of a conversion and an add
    per metric. Each entry is still ``0.0 + double(v_1) + double(v_2) + ...`` in micro-batch
    order, so the sums are bit for bit what per-metric accumulation gives."""

    def __init__(self):
        self.keys: Optional[tuple] = None
        self.vec: Optional[torch.Tensor] = None
        # Per-metric sums, used only if micro-batches ever return different metrics.
        self.by_key: Optional[dict] = None

    @staticmethod
    def _pack(values: dict) -> tuple:
        groups: dict = {}
        for k in sorted(values):
            groups.setdefault(values[k].dtype, []).append(k)
        keys = tuple(k for ks in groups.values() for k in ks)
        parts = [torch.stack([values[k].detach().reshape(()) for k in ks]).double()
                 for ks in groups.values()]
        return keys, parts[0] if len(parts) == 1 else torch.cat(parts)

    def add(self, values: dict) -> None:
        keys, vec = self._pack(values)
        if self.by_key is None and self.keys is None:
            self.keys, self.vec = keys, 0.0 + vec
        elif self.by_key is None and keys == self.keys:
            self.vec = self.vec + vec
        else:
            if self.by_key is None:
                self.by_key, self.keys, self.vec = self.as_dict(), None, None
            for k, v in zip(keys, vec.unbind()):
                self.by_key[k] = self.by_key.get(k, 0.0) + v

    def as_dict(self) -> dict:
        if self.by_key is not None:
            return dict(self.by_key)
        return dict(zip(self.keys, self.vec.unbind())) if self.keys is not None else {}


def _finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False,
                    defer_scale: Optional[DeferredGradScale] = None):
    """megatron's finalize_model_grads (DP reduce), then the 1 / global-token-count scale.

    megatron's own scaling tests ``if num_tokens > 0`` on the host: a device sync that drains
    the GPU's queue right before the optimizer step. The same broadcast (from the last pipeline
    stage), all-reduce (data x context parallel) and scale are done here with the zero case
    decided on the device (scale 1, as megatron's skip leaves the gradients unchanged)."""
    with prange("finalize_grads"):
        finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
        if num_tokens is None:
            return
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel.utils import get_pp_last_rank

        pp_group = pg_collection.pp if pg_collection is not None else ps.get_pipeline_model_parallel_group()
        dp_cp_group = (pg_collection.dp_cp if pg_collection is not None
                       else ps.get_data_parallel_group(with_context_parallel=True))
        dist.broadcast(num_tokens, src=get_pp_last_rank(pp_group), group=pp_group)
        dist.all_reduce(num_tokens, group=dp_cp_group)
        one = torch.ones_like(num_tokens, dtype=torch.float32)
        scaling = torch.where(num_tokens > 0, 1.0 / num_tokens.clamp(min=1), one)
        if defer_scale is not None:  # the lean optimizer divides by it in its update
            defer_scale.scale = scaling
            return
        for chunk in model:
            chunk.scale_gradients(scaling)


class TrainStep:
    """Forward/backward over all micro-batches + one optimizer step, for DDP-wrapped chunks."""

    def __init__(self, model_chunks: list, optim: OptimizerBundle, rt: ParallelRuntime, *,
                 micro_batch_tokens: int, batch_equal_lengths: bool = True):
        self.chunks, self.optim, self.rt = model_chunks, optim, rt
        self.micro_batch_tokens = micro_batch_tokens
        self.batch_equal_lengths = batch_equal_lengths
        config = unwrap(model_chunks[0]).config
        # megatron reads these hooks from the (shared) TransformerConfig.
        no_sync = [c.no_sync for c in model_chunks]
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        if model_chunks[0].ddp_config.overlap_grad_reduce:
            grad_sync = [c.start_grad_sync for c in model_chunks]
            config.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
        # Sync-free steps need fused Adam (GPU runs get it from build_optimizer); CPU runs keep
        # the host path, whose results earlier runs were checked against bit for bit.
        self.sync_free = sync_free_supported(optim.optimizer)
        self._token_scale = (DeferredGradScale() if self.sync_free and folds_token_scale(optim.optimizer)
                             else None)
        config.finalize_model_grads_func = (
            functools.partial(_finalize_grads, defer_scale=self._token_scale)
            if self._token_scale is not None else _finalize_grads)
        self._biased_moe = any(m.expert_bias is not None for m in moe_layers(model_chunks))
        # The DDP grad buffers, for the clip's norm (device_step.whole_buffers).
        self._grad_buffers = [b for c in model_chunks for b in
                              getattr(c, "buffers", []) + getattr(c, "expert_parallel_buffers", [])]
        self._pending: Optional[StepResult] = None

    def forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> dict:
        """Gradients into the DDP buffers (finalised and scaled); returns global sums."""
        with prange("forward_backward"):
            return self._forward_backward(micro_batches, loss_fn)

    def _forward_backward(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn) -> dict:
        rt = self.rt
        sums = MetricSums()

        def on_logits(logits_shard, mb):
            loss_sum, num_tokens, metrics = loss_fn(logits_shard, mb)
            num_tokens = torch.as_tensor(num_tokens, device=logits_shard.device).to(torch.int32)
            sums.add({"loss_sum": loss_sum, "num_tokens": num_tokens, **metrics})
            return loss_sum, num_tokens, {}

        if getattr(loss_fn, "mtp_loss", None) is not None:
            on_logits.mtp_loss = loss_fn.mtp_loss  # the schedule adds it after the task loss
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optim.optimizer.zero_grad()
        _schedule(self.chunks, rt, micro_batches, on_logits, forward_only=False,
                  batch_equal_lengths=self.batch_equal_lengths)
        return self._global_sums(sums.as_dict())

    def _global_sums(self, sums: dict) -> dict:
        """Sum over DP on the last stage, then hand the dict to every pipeline stage.

        Sync-free steps without pipelining keep the sums on the device (0-d tensors); otherwise
        they come back as host floats (the pipeline broadcast is an object broadcast)."""
        rt = self.rt
        out = None
        if rt.is_last_stage:
            keys = sorted(sums)
            vec = torch.stack([torch.as_tensor(sums[k], device=rt.device).double() for k in keys])
            if rt.dp_size > 1:
                dist.all_reduce(vec, group=rt.dp_group)
            if self.sync_free and rt.pp_size == 1:
                return dict(zip(keys, vec.unbind()))
            out = dict(zip(keys, vec.tolist()))
        if rt.pp_size > 1:
            box = [out]
            dist.broadcast_object_list(box, src=rt.pp_last_rank, group=rt.pp_group,
                                       device=rt.device if rt.device.type == "cuda" else None)
            out = box[0]
        return out

    def micro_batches(self, samples: Sequence[dict]) -> list[MicroBatch]:
        return _micro_batches(samples, self.rt, self.micro_batch_tokens, self.chunks)

    def optimizer_step(self, sums: dict, num_micro_batches: int) -> StepResult:
        """Clip, step the lr schedule and the optimizer, after :meth:`forward_backward`."""
        with prange("optimizer_step"):
            try:
                return self._optimizer_step(sums, num_micro_batches)
            finally:
                new_weight_generation()  # FP8 weight copies (training, rollout) are stale now

    def _optimizer_step(self, sums: dict, num_micro_batches: int) -> StepResult:
        # A skipped update must not advance the schedule; the previous sync-free step says
        # whether it was skipped only when read, so it is read (long finished) before stepping.
        if self._pending is not None:
            self._pending.update_successful  # noqa: B018 - resolves, and rolls back if skipped
            self._pending = None
        if self.sync_free:
            result = self._device_step(dict(sums), num_micro_batches)
            self._pending = result
            return result
        sums = dict(sums)
        tokens = int(sums.pop("num_tokens"))
        loss = sums["loss_sum"] / max(tokens, 1)
        if not math.isfinite(loss):
            self._balance_experts(False)
            # A non-finite loss would poison Adam's moments; the trainer decides whether to stop.
            return StepResult(loss=loss, num_tokens=tokens, lr=self.optim.lr,
                              update_successful=False, num_micro_batches=num_micro_batches,
                              metrics_sum=sums)
        self.optim.scheduler.step(increment=1)
        # A finite loss can still come with a NaN/Inf gradient: the guarded step skips those too.
        ok, grad_norm = guarded_optimizer_step(self.optim.optimizer)
        lr = self.optim.lr
        if not ok:
            self.optim.scheduler.step(increment=-1)
        self._balance_experts(bool(ok))
        return StepResult(loss=loss, num_tokens=tokens, grad_norm=grad_norm, lr=lr,
                          update_successful=bool(ok), num_micro_batches=num_micro_batches,
                          metrics_sum=sums)

    def _device_step(self, sums: dict, num_micro_batches: int) -> StepResult:
        """The same decisions as the host path, taken on the device (see device_step.py)."""
        dev = self.rt.device
        sums = {k: torch.as_tensor(v, dtype=torch.float64, device=dev) for k, v in sums.items()}
        tokens = sums.pop("num_tokens")
        loss = sums["loss_sum"] / tokens.clamp(min=1)
        self.optim.scheduler.step(increment=1)
        lr = self.optim.lr
        prescale = self._token_scale.take() if self._token_scale is not None else None
        ok, norm = device_optimizer_step(self.optim.optimizer, torch.isfinite(loss), dev, prescale,
                                         self._grad_buffers)
        self._balance_experts(ok.bool())
        keys = sorted(sums)
        vec = torch.cat([ok.double(), norm.double(), tokens.reshape(1), loss.reshape(1)]
                        + [sums[k].reshape(1) for k in keys])
        scheduler = self.optim.scheduler

        def roll_back_if_skipped(values):
            if not values[0]:
                scheduler.step(increment=-1)

        return StepResult(lr=lr, num_micro_batches=num_micro_batches,
                          readback=Readback(vec, roll_back_if_skipped), metric_keys=keys)

    def _balance_experts(self, applied) -> None:
        """DeepSeek-V3's expert-bias step from this step's training loads (MoE models with
        model.moe_bias_update_rate > 0; nothing otherwise). Once per optimizer step, here and
        nowhere else: forward-only passes never count loads."""
        if self._biased_moe:
            update_expert_biases(self.chunks, self.rt.dp_group if self.rt.dp_size > 1 else None,
                                 applied=applied)

    def __call__(self, samples: Sequence[dict], loss_fn: LossFn) -> StepResult:
        """This rank's share of the global batch -> one optimizer step."""
        mbs = self.micro_batches(samples)
        return self.optimizer_step(self.forward_backward(mbs, loss_fn), len(mbs))
