"""The colocated rollout engine: generate completions from the policy's own weights.

    engine = RolloutEngine(model_chunks, cfg.rollout, ctx, eos_ids=[tok.eos_id], decode_fn=tok.decode)
    completions = engine.generate([GenerationRequest(prompt_ids, n=8, seed=step)])
    engine.release()   # the KV cache goes back before the training phase

Each data-parallel rank calls ``generate`` with its own prompts; TP ranks of one model call it
with the same prompts and take the same scheduling decisions, because every sampled token is
agreed on through the vocab-parallel reductions in :mod:`r1mega.rollout.sampling`.

Expert parallelism (parallel.expert > 1): every MoE layer is an all-to-all over the EP group, so
the group's ranks step together although each schedules its own prompts. Before each step one
all-reduce (MAX) of a "still working" flag over the EP group decides whether anyone has work; a
rank that has none runs an empty step (zero tokens through the MoE layers) until all are done.
Ranks may be in different phases (one prefilling, one decoding): the all-to-alls only need each
rank to run every MoE layer once per step, which every step does. That path is eager: the
all-to-all's split sizes go to the host, so neither CUDA graphs nor the compiled decode apply.

Routing replay (rollout.routing_replay): each step's forward records the experts every MoE layer
chose per token (r1mega/rollout/routes.py); each Completion carries them for the training forward.
Recording reads the routes back every step, which the captured decode graphs cannot do: they are
off when recording.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from r1mega.rollout import triton_mla, triton_paged
from r1mega.rollout.attention import AttentionBatch, padded_query_index, prefill_positions_slots
from r1mega.rollout.cuda_graphs import BT, CTX, IDS, KEY, POS, SLOT, DecodeGraphs
from r1mega.rollout.kv_cache import KVCacheShape, PagedKVCache, blocks_for_budget, kv_cache_dtype
from r1mega.ops.batch_invariant import exact_numerics
from r1mega.rollout.exact import enable_exact
from r1mega.rollout.model_runner import ModelRunner, sequence_parallel_off
from r1mega.rollout.overlap import OverlappedDecoder
from r1mega.rollout.routes import RouteRecorder
from r1mega.rollout.sampling import (
    SamplingBatch,
    VocabShard,
    hashed_vocab_ids,
    sample,
    sequence_key,
    step_keys,
)
from r1mega.rollout.scheduler import DecodePlan, PromptGroup, SamplingParams, Scheduler, Sequence
from r1mega.rollout.stopping import StopChecker
from r1mega.rollout.types import Completion, GenerationRequest


class RolloutEngine:
    def __init__(
        self,
        model_chunks,
        rollout_cfg,
        ctx,
        *,
        eos_ids,
        decode_fn: Optional[Callable[[list], str]] = None,
        vocab_size: Optional[int] = None,
        attention_backend: str = "auto",
        overlap_steps: Optional[bool] = None,
    ):
        """``vocab_size``: the tokenizer's vocabulary; ids past it (embedding padding for TP
        divisibility) are never sampled. None: every row of the embedding may be sampled.
        ``attention_backend``: "auto" (Triton paged decode on GPU, SDPA otherwise) or "gather"
        (always the gather + SDPA reference path). ``overlap_steps``: launch decode step k+1
        before reading step k (see overlap.py); None takes ``rollout_cfg.overlap_steps``."""
        self.cfg = rollout_cfg
        self.runner = r = ModelRunner(model_chunks, ctx, attention_backend=attention_backend)
        self.device = r.device
        # the graph step's "no top-k / top-p", expanded per batch: views, no fill kernel a replay
        self._no_top_k = torch.zeros((), dtype=torch.int64, device=self.device)
        self._no_top_p = torch.ones((), dtype=torch.float32, device=self.device)
        self.block_tokens = int(rollout_cfg.kv_block_tokens)
        cache_dtype = kv_cache_dtype(getattr(rollout_cfg, "kv_cache_dtype", "auto"), r.param_dtype,
                                     r.device, keys_only=r.mla is not None,
                                     exact=bool(getattr(rollout_cfg, "exact", False)))
        self.cache = PagedKVCache(
            KVCacheShape(len(r.layers), r.num_kv_heads, r.head_dim, self.block_tokens, cache_dtype,
                         keys_only=r.mla is not None),
            r.device,
        )
        r.cache = self.cache
        tp_group = r.tp_group if r.tp_size > 1 else None
        padded = r.vocab_local * r.tp_size
        self.shard = VocabShard(r.vocab_start, r.vocab_local, min(vocab_size or padded, padded), tp_group)
        self.vocab_hashed = hashed_vocab_ids(r.vocab_start, r.vocab_local, r.device)
        self.stopper = StopChecker(eos_ids, decode_fn, r.max_positions)
        self.decode_fn = decode_fn
        on_gpu = r.device.type == "cuda"
        # Decode from device tensors only (Triton kernels, CUDA graphs): GQA kernels need a
        # power-of-two head size; MLA's latent rows (r + d_r) have their own kernel.
        kernel_ok = (r.head_dim & (r.head_dim - 1) == 0 if r.mla is None
                     else triton_mla.kernel_supports(r.mla.latent_dim, r.mla.rope_dim))
        self.use_triton = on_gpu and triton_paged.HAVE_TRITON and attention_backend == "auto" and kernel_ok
        record = bool(getattr(rollout_cfg, "routing_replay", False)) and bool(r.moe_layers)
        self.routes: Optional[RouteRecorder] = RouteRecorder(r.model, r.device) if record else None
        self.use_graphs = (bool(rollout_cfg.cuda_graphs) and self.use_triton and r.graph_capturable
                           and self.routes is None)
        self.overlap_steps = bool(rollout_cfg.overlap_steps if overlap_steps is None else overlap_steps)
        self.graphs: Optional[DecodeGraphs] = None
        self._compiled_decode = None
        self.stats: dict = {}
        self.exact = False  # rollout.exact: batch-invariant numerics (r1mega/rollout/exact.py)
        if getattr(rollout_cfg, "exact", False):
            enable_exact(self)

    # ------------------------------------------------------------------ cache lifetime

    def max_blocks_per_seq(self) -> int:
        limit = self.runner.max_positions or 32768
        return -(-limit // self.block_tokens)

    def allocate(self, max_blocks: Optional[int] = None) -> None:
        """Take the KV cache memory (done by ``generate`` when needed): the configured share of
        free memory, capped at ``max_blocks`` (what the requests can use at most)."""
        if self.cache.is_allocated:
            if max_blocks is None or self.cache.num_blocks >= max_blocks:
                return
            self.release()  # kept from a smaller earlier call (no release in between): grow it
        n = blocks_for_budget(
            self.cache.shape, self.device,
            memory_fraction=self.cfg.kv_memory_fraction, cpu_token_budget=self.cfg.kv_cpu_tokens,
            max_blocks=max_blocks,
        )
        self.cache.allocate(n)

    def blocks_needed(self, groups) -> int:
        """Upper bound on the blocks ``groups`` can hold at once (no prefix sharing assumed, +1
        scratch block), plus the scheduler's admission watermark: without it a prompt whose
        completion ends in its own last block finds one block too few to be admitted, and nothing
        else ever frees one. A GRPO step of 64 short completions needs a few hundred MB, not the
        configured share of the GPU (65 GB on the H200), which was zeroed and freed every step."""
        bs, limit = self.block_tokens, self.runner.max_positions or 0
        total = 1
        for g in groups:
            for s in g.samples:
                length = s.prompt_len + s.params.max_new_tokens + 1
                if limit:
                    length = min(length, limit)
                total += -(-length // bs)
        # The smallest reserve w with w >= admission_watermark(total + w).
        return total + max(1, -(-total // 99))

    def end_phase(self) -> None:
        """After a rollout phase: free the cache (and its graphs) for training, unless it is small
        enough to keep (``rollout.kv_keep_max_fraction`` of device memory), in which case the next
        phase reuses it and replays the same graphs: parameters are updated in place, so the
        graphs read the new weights."""
        keep = self.cfg.kv_keep_max_fraction
        if keep > 0 and self.cache.is_allocated and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            if self.cache.num_blocks * self.cache.shape.bytes_per_block <= keep * total:
                return
        self.release()

    def release(self) -> None:
        """Free the KV cache and the CUDA graphs that point into it (before training)."""
        if self.graphs is not None:
            self.graphs.clear()
            self.graphs = None
        self.cache.release()

    # ------------------------------------------------------------------ requests

    def _params(self, req: GenerationRequest) -> SamplingParams:
        c = self.cfg
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return SamplingParams(
            temperature=float(pick(req.temperature, c.temperature)),
            top_p=float(pick(req.top_p, c.top_p)),
            top_k=int(pick(req.top_k, c.top_k)),
            max_new_tokens=int(pick(req.max_new_tokens, c.max_new_tokens)),
            stop=tuple(pick(req.stop, c.stop) or ()),
        )

    def _groups(self, requests) -> list[PromptGroup]:
        groups, seq_id = [], 0
        limit = self.runner.max_positions
        for i, req in enumerate(requests):
            prompt = [int(t) for t in req.prompt_ids]
            where = f"request {i}"
            if not prompt:
                raise ValueError(f"{where} has an empty prompt; every prompt needs at least one token.")
            if min(prompt, default=0) < 0 or max(prompt, default=0) >= self.shard.true_vocab:
                bad = [t for t in prompt if not 0 <= t < self.shard.true_vocab]
                raise ValueError(
                    f"{where}: token ids {bad[:5]} are outside the vocabulary [0, "
                    f"{self.shard.true_vocab}); check the tokenizer matches the model."
                )
            if limit and len(prompt) >= limit:
                raise ValueError(
                    f"{where}: prompt of {len(prompt)} tokens leaves no room under the model's "
                    f"maximum sequence length {limit}; shorten it (data.max_prompt_tokens)."
                )
            if req.n < 1:
                raise ValueError(f"{where}: n={req.n}, need at least one sample.")
            if req.n > self.cfg.max_batch_sequences:
                raise ValueError(
                    f"{where}: n={req.n} samples share one prefill and must run together, but "
                    f"rollout.max_batch_sequences={self.cfg.max_batch_sequences}; raise it to >= {req.n}."
                )
            params = self._params(req)
            self.stopper.require_decode_for(params.stop, where)
            samples = []
            for j in range(req.n):
                samples.append(Sequence(seq_id, i, j, len(prompt), list(prompt), params,
                                        sequence_key(int(req.seed), j), plain=params.is_plain))
                seq_id += 1
            groups.append(PromptGroup(i, prompt, samples))
        return groups

    # ------------------------------------------------------------------ generation

    def generate(self, requests, progress: Optional[Callable[[int], None]] = None,
                 on_finish: Optional[Callable[[list], None]] = None) -> list[Completion]:
        """Sample every request's ``n`` completions. ``progress(k)`` is called as k finish;
        ``on_finish(completions)`` with the :class:`Completion` of each as it finishes, while
        the others still decode (the trainer scores them meanwhile). Returns every completion,
        sorted by (prompt, sample), the same objects ``on_finish`` saw."""
        requests = list(requests)
        try:
            groups = self._groups(requests)
        except ValueError:
            self._all_ranks_ok(False)  # EP peers raise too rather than wait for this rank's steps
            raise
        if not self._all_ranks_ok(True):
            raise RuntimeError("rollout: an expert-parallel peer rank rejected its requests (its error "
                               "names the request); this rank stops with it instead of waiting.")
        self.allocate(self.blocks_needed(groups))
        sched = Scheduler(
            self.cache.allocator, self.block_tokens,
            max_batch_sequences=self.cfg.max_batch_sequences,
            max_prefill_tokens=self.cfg.max_prefill_tokens,
        )
        for g in groups:
            sched.add(g)
        self._mirror_rows([s for g in groups for s in g.samples])
        done: list[Completion] = []
        capture0 = self._capture_s()
        t0 = time.perf_counter()
        steps = {"prefill": 0, "decode": 0, "empty": 0}
        seconds = {"prefill": 0.0, "decode": 0.0}
        overlap = OverlappedDecoder(self) if self.overlap_steps and self.use_graphs else None
        with torch.no_grad(), sequence_parallel_off(self.runner.model), exact_numerics(self.exact):
            while self._any_rank_working(sched.has_work or bool(overlap and overlap.pending)):
                t_step = time.perf_counter()
                if not (sched.has_work or (overlap and overlap.pending)):
                    self.runner.empty_step()  # this rank is done; its EP peers are not
                    steps["empty"] += 1
                    continue
                if overlap and overlap.pending:
                    kind = "decode"
                    sampled, launched = overlap.advance(sched)
                    steps[kind] += int(launched)
                else:
                    plan = sched.schedule()
                    if plan is None:
                        raise RuntimeError("rollout scheduler stalled with work left (scheduler bug)")
                    kind = "decode" if isinstance(plan, DecodePlan) else "prefill"
                    if kind == "decode" and overlap and self._graph_eligible(plan.seqs):
                        overlap.launch(plan.seqs)
                        sampled = []
                    else:
                        sampled = self._decode(plan.seqs) if kind == "decode" else self._prefill(plan, sched)
                    steps[kind] += 1
                # Each step ends in a host sync, so wall time per kind is device time + host time.
                seconds[kind] += time.perf_counter() - t_step
                finished = [s for s in sampled if self.stopper.check(s)]
                if not finished:
                    continue
                sched.finish_many(finished)
                completions = [self._completion(s) for s in finished]
                done.extend(completions)
                if progress:
                    progress(len(finished))
                if on_finish:
                    on_finish(completions)
        elapsed = time.perf_counter() - t0
        new_tokens = sum(len(c.token_ids) for c in done)
        self.stats = {"seconds": elapsed, "new_tokens": new_tokens, "preemptions": sched.num_preemptions,
                      "tokens_per_s": new_tokens / max(elapsed, 1e-9), **steps,
                      "graph_captures": self.graphs.captures if self.graphs is not None else 0,
                      "capture_s": self._capture_s() - capture0,
                      "prefill_s": seconds["prefill"], "decode_s": seconds["decode"],
                      "overlap_drains": overlap.drains if overlap else 0,
                      # whether the decode step ran compiled (a compile failure falls back with a
                      # warning, which a bench's log may not show)
                      "decode_compiled": self._compiled_decode not in (None, self._decode_logits)}
        done.sort(key=lambda c: (c.prompt_index, c.sample_index))
        return done

    def _any_rank_working(self, working: bool) -> bool:
        """Whether any rank of the expert-parallel group still has work (``working``: this one).
        One small all-reduce per step; without EP, just ``working``."""
        if self.runner.ep_group is None:
            return working
        flag = torch.tensor([int(working)], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.runner.ep_group)
        return bool(flag.item())

    def _all_ranks_ok(self, ok: bool) -> bool:
        """Whether every rank of the expert-parallel group accepted its requests."""
        return not self._any_rank_working(not ok)

    def _forward(self, *args, replay: Optional[torch.Tensor] = None, **kw):
        """runner.forward -> (logits, this step's routes on the host, or None when not recording)."""
        if self.routes is None:
            return self.runner.forward(*args, **kw), None
        return self.routes.forward(self.runner.forward, *args, replay=replay, **kw)

    def _capture_s(self) -> float:
        # Within a call the graphs only go from None to new ones (allocate releases them before
        # the first reading, end_phase after the call), so two readings differ by this call's.
        return self.graphs.capture_s if self.graphs is not None else 0.0

    def _mirror_rows(self, seqs: list[Sequence]) -> None:
        """Host arrays indexed by ``seq_id`` of what a decode step packs per row: the block
        tables (rows rewritten only when a sequence's blocks change) and the per-sequence
        constants, so a step gathers them with numpy indexing instead of Python per row."""
        self._bt_host = np.zeros((len(seqs), self.max_blocks_per_seq()), dtype=np.int64)
        self._key_host = np.array([s.key for s in seqs], dtype=np.int64)
        self._prompt_len_host = np.array([s.prompt_len for s in seqs], dtype=np.int64)
        self._temp_host = np.array([s.params.temperature for s in seqs], dtype=np.float32)
        assert all(s.seq_id == i for i, s in enumerate(seqs)), "seq_id must index the mirrors"

    def _completion(self, s: Sequence) -> Completion:
        text = s.text
        if text is None and self.decode_fn is not None:
            text = self.decode_fn(s.generated)
        return Completion(
            prompt_index=s.prompt_index, sample_index=s.sample_index, token_ids=list(s.generated),
            logprobs=list(s.logprobs), finish_reason=s.finish_reason,
            logprobs_t1=list(s.logprobs_t1) if self.cfg.return_logprobs_t1 else None,
            text=text, stop_reason=s.stop_reason,
            routes=RouteRecorder.of(s) if self.routes is not None else None,
        )

    # ------------------------------------------------------------------ steps

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, seqs_blocks: list) -> torch.Tensor:
        width = max(len(b) for b in seqs_blocks)
        rows = [b + [0] * (width - len(b)) for b in seqs_blocks]
        return self._tensor(rows, torch.int32)

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        temps = [s.params.temperature for s in seqs]
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        keys = step_keys(self._tensor([s.key for s in seqs]), self._tensor([s.num_generated for s in seqs]))
        return SamplingBatch(
            temperature=self._tensor(temps, torch.float32), top_k=self._tensor(top_k),
            top_p=self._tensor(top_p, torch.float32), keys=keys,
            top_k_max=max(top_k), use_top_p=any(p < 1.0 for p in top_p),
            any_greedy=any(t <= 0 for t in temps), want_logprobs_t1=bool(self.cfg.return_logprobs_t1),
        )

    def _record(self, seqs: list[Sequence], tokens, logprobs, logprobs_t1) -> list[Sequence]:
        # The one host synchronisation of the step: tokens and log-probs come back together.
        parts = [tokens.double(), logprobs.double()] + ([logprobs_t1.double()] if logprobs_t1 is not None else [])
        rows = torch.stack(parts, dim=1).tolist()
        for s, row in zip(seqs, rows):
            s.tokens.append(int(row[0]))
            s.logprobs.append(row[1])
            if logprobs_t1 is not None:
                s.logprobs_t1.append(row[2])
        return seqs

    def _prefill(self, plan, sched: Scheduler) -> list[Sequence]:
        ids, blocks, q_lens, logit_rows, t = [], [], [], [], 0
        for g in plan.groups:
            ids += g.prompt
            blocks.append(g.blocks)
            q_lens.append(len(g.prompt))
            t += len(g.prompt)
            logit_rows.append(t - 1)
        for s in plan.resumed:
            ids += s.tokens[:-1]
            blocks.append(s.blocks)
            q_lens.append(len(s.tokens) - 1)
            t += len(s.tokens) - 1
        bs = self.block_tokens
        block_tables = self._block_tables(blocks)
        positions, slots = prefill_positions_slots(q_lens, block_tables, bs)
        batch = AttentionBatch(
            slots=slots, positions=positions, q_lens=q_lens,
            ctx_lens=self._tensor(q_lens, torch.int32), ctx_lens_host=q_lens,
            block_tables=block_tables, block_tokens=bs,
            q_index=padded_query_index(q_lens, self.device),
        )
        rows = self._tensor(logit_rows) if logit_rows else None
        # A recompute after preemption routes the cached tokens as they were routed first.
        replay = RouteRecorder.prefill_replay(plan) if self.routes is not None else None
        logits, routes = self._forward(self._tensor(ids), batch.positions, batch.slots, rows, batch,
                                       replay=replay)
        if routes is not None:
            RouteRecorder.after_prefill(plan, routes)
        for s in plan.resumed:
            sched.resume(s)
        sampled: list[Sequence] = []
        row_of: list[int] = []
        copies: list[tuple[int, int]] = []
        for gi, g in enumerate(plan.groups):
            copies += sched.admit_group(g)
            sampled += g.samples
            row_of += [gi] * len(g.samples)
        self.cache.copy_blocks(copies)  # all groups' copy-on-write blocks in one batched copy
        if not sampled:
            return []
        logits = logits[self._tensor(row_of)]  # each sample of a prompt draws from its logits row
        tokens, lps, lp1 = sample(logits, self._sampling_batch(sampled), self.shard, self.vocab_hashed)
        return self._record(sampled, tokens, lps, lp1)

    def _graph_eligible(self, seqs: list[Sequence]) -> bool:
        return (self.use_graphs and len(seqs) <= self.cfg.max_batch_sequences
                and not self.cfg.return_logprobs_t1 and all(s.plain for s in seqs))

    def _decode(self, seqs: list[Sequence]) -> list[Sequence]:
        if self._graph_eligible(seqs):
            return self._decode_graph(seqs)
        bs = self.block_tokens
        ids = self._tensor([s.tokens[-1] for s in seqs])
        pos_host = [s.num_cached for s in seqs]
        positions = self._tensor(pos_host)
        block_tables = self._block_tables([s.blocks for s in seqs])
        ctx_host = [p + 1 for p in pos_host]
        ctx_lens = self._tensor(ctx_host, torch.int32)
        sb = self._sampling_batch(seqs)
        for s in seqs:
            s.num_cached += 1
        slots = self._tensor([blk[p // bs] * bs + p % bs for blk, p in
                              zip((s.blocks for s in seqs), pos_host)])
        if self.use_triton:
            logits, routes = self._forward(ids, positions, slots, None, decode_tensors=(block_tables, ctx_lens))
        else:
            batch = AttentionBatch(
                slots=slots, positions=positions, q_lens=[1] * len(seqs), ctx_lens=ctx_lens,
                ctx_lens_host=ctx_host, block_tables=block_tables, block_tokens=bs,
                q_index=torch.arange(len(seqs), device=self.device)[:, None],
            )
            logits, routes = self._forward(ids, positions, slots, None, batch)
        if routes is not None:
            RouteRecorder.after_decode(seqs, routes)
        tokens, lps, lp1 = sample(logits, sb, self.shard, self.vocab_hashed)
        return self._record(seqs, tokens, lps, lp1)

    def _decode_graph(self, seqs: list[Sequence]) -> list[Sequence]:
        """Decode step through the captured graphs: inputs packed on the host, one copy each way."""
        width = self._fill_host(seqs, slot=0)
        out = self.graphs.run(len(seqs), BT + width, slot=0)
        for s in seqs:
            s.num_cached += 1
        for s, (tok, lp) in zip(seqs, out.tolist()):  # the step's one synchronisation
            s.tokens.append(int(tok))
            s.logprobs.append(lp)
        return seqs

    def _fill_host(self, seqs: list[Sequence], slot: int, with_ids: bool = True,
                   src_rows: Optional[list] = None) -> int:
        """Pack the step's per-row inputs into pinned host buffer ``slot``; returns the block-table
        width used. ``with_ids`` False leaves the token column to the device, which copies the
        previous step's row i, or with ``src_rows`` its row ``src_rows[i]``, written there."""
        if self.graphs is None:
            self._capture_graphs(len(seqs))
        g, n, bt = self.graphs, len(seqs), self._bt_host
        width = 0
        for s in seqs:
            nb = len(s.blocks)
            if s.bt_len != nb:
                bt[s.seq_id, :nb] = s.blocks
                s.bt_len = nb
            if nb > width:
                width = nb
        rows = np.fromiter((s.seq_id for s in seqs), np.int64, n)
        pos = np.fromiter((s.num_cached for s in seqs), np.int64, n)
        host = g.host_rows(slot, n, BT + width).numpy()
        if with_ids:
            host[:, IDS] = [s.tokens[-1] for s in seqs]
        elif src_rows is not None:
            host[:, IDS] = src_rows
        host[:, POS] = pos
        host[:, CTX] = pos + 1
        # The step index is the number of tokens sampled before this one, including one the
        # host has not read yet when steps overlap (num_cached counts it already).
        host[:, KEY] = step_keys(self._key_host[rows], pos - self._prompt_len_host[rows] + 1)
        bs = self.block_tokens
        host[:, SLOT] = bt[rows, pos // bs] * bs + pos % bs
        host[:, BT:] = bt[rows, :width]
        g.host_temp_slots[slot].numpy()[:n] = self._temp_host[rows]
        return width

    def _decode_logits(self, ids, positions, slots, block_tables, ctx_lens):
        return self.runner.forward(ids, positions, slots, None, decode_tensors=(block_tables, ctx_lens))

    def _decode_forward(self):
        """The decode forward, through torch.compile on GPU (``rollout.compile_decode``):
        inductor fuses the norms', RoPE's and residuals' elementwise kernels, the step's main
        cost at decode batch sizes (measured on an H200, 852M shape: graph replay of 16 rows
        1.95 -> 1.37 ms). The compiled code is then captured in the CUDA graphs."""
        if self._compiled_decode is None:
            fn = self._decode_logits
            if getattr(self.cfg, "compile_decode", False) and self.device.type == "cuda" \
                    and not self.exact:
                fn = torch.compile(self._decode_logits, dynamic=True)
            self._compiled_decode = fn
        return self._compiled_decode

    def _capture_graphs(self, n: int) -> None:
        """Graphs for this rollout phase; the bucket of the first batch (``n`` rows) is captured
        now, the others when a step first needs them (see cuda_graphs.py)."""
        def make():
            g = DecodeGraphs(self._graph_step, self.cfg.max_batch_sequences, self.max_blocks_per_seq(),
                             self.device)
            g.capture([g.bucket_for(n)])
            return g

        try:
            self.graphs = make()
            return
        except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the rollout
            if self._compiled_decode == self._decode_logits:
                raise
            first = exc
        # torch 2.11's inductor asserts in its memory-coalescing analysis (tiling_utils,
        # get_pw_red_splits) on the blockwise FP8 rollout's dynamic-shape quantiser; that analysis
        # only picks tilings, so the step compiles without it before it is given up.
        self._compiled_decode = torch.compile(self._decode_logits, dynamic=True,
                                              options={"triton.coalesce_tiling_analysis": False})
        try:
            self.graphs = make()
            return
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"rollout: torch.compile of the decode step failed ({type(first).__name__}: "
                          f"{first}; without inductor's coalescing analysis: {type(exc).__name__}: "
                          f"{exc}); continuing eagerly. Set rollout.compile_decode=false to skip it.")
        self._compiled_decode = self._decode_logits
        self.graphs = make()

    def _graph_step(self, ints: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Decode forward + temperature sampling as pure tensor code, for capture.

        ints (b, BT + W) int64 packed rows (see cuda_graphs); returns (b, 2) [token, log-prob]."""
        positions = ints[:, POS]
        block_tables = ints[:, BT:]
        ctx_lens = ints[:, CTX].to(torch.int32)  # contiguous, for the kernel's flat index
        logits = self._decode_forward()(ints[:, IDS], positions, ints[:, SLOT], block_tables, ctx_lens)
        b = positions.shape[0]
        sb = SamplingBatch(temperature=temperature, top_k=self._no_top_k.expand(b),
                           top_p=self._no_top_p.expand(b), keys=ints[:, KEY])
        tokens, lps, _ = sample(logits, sb, self.shard, self.vocab_hashed)
        return torch.stack([tokens.double(), lps.double()], dim=1)
