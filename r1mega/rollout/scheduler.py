"""Continuous batching: which sequences run in the next step, and their KV blocks.

Each engine step is either a *prefill* (new prompts, plus sequences resumed after preemption) or
a *decode* (one new token for every running sequence). Prefill goes first whenever a prompt is
waiting and fits, so finished sequences are replaced at once and the decode batch stays full.

The G samples of one prompt share its prefill: the prompt runs once, sample 0 owns its blocks,
the others take a reference to every full prompt block and a private copy of the last, partly
filled one (copy-on-write: that is the only prompt block a sample will write into).

When a decode step needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it waits to be recomputed (prefill of its prompt and the
tokens generated so far). Its RNG is counter-based, so it continues exactly as it would have.

Invariant of a running sequence: every token but the last is in the cache
(``num_cached == len(tokens) - 1``); the last one is the next decode step's input.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from r1mega.rollout.kv_cache import BlockAllocator, OutOfBlocks


@dataclass
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple = ()

    @property
    def is_plain(self) -> bool:
        """No top-k/top-p truncation: the CUDA-graph decode path's case. Greedy rows fit too:
        without truncation their log-prob (temperature 1) is what the plain path computes."""
        return self.top_k == 0 and self.top_p >= 1.0


@dataclass
class Sequence:
    seq_id: int
    prompt_index: int
    sample_index: int
    prompt_len: int
    tokens: list  # prompt + generated
    params: SamplingParams
    key: int  # counter-based RNG key of this completion
    blocks: list = field(default_factory=list)
    num_cached: int = 0
    logprobs: list = field(default_factory=list)
    logprobs_t1: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    text: Optional[str] = None
    plain: bool = False  # params.is_plain, cached: checked for every row of every decode step
    bt_len: int = -1  # blocks already mirrored in the engine's host block table (-1: none)
    # Routing replay: (L_moe, n, k) host chunks of the experts chosen for tokens[:num fed];
    # kept through preemption, whose recompute replays them (see RolloutEngine._prefill).
    routes: list = field(default_factory=list)

    @property
    def generated(self) -> list:
        return self.tokens[self.prompt_len:]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class PromptGroup:
    """A prompt waiting for prefill, with the G sequences it will fork into."""

    prompt_index: int
    prompt: list
    samples: list  # list[Sequence], not yet holding blocks
    blocks: list = field(default_factory=list)  # the prompt's blocks, taken at planning
    copy_blocks: list = field(default_factory=list)  # private last blocks of samples 1..G-1


@dataclass
class PrefillPlan:
    groups: list  # PromptGroup: prefill the prompt, sample the first token of each sample
    resumed: list  # Sequence: recompute the cache of tokens[:-1], no sampling


@dataclass
class DecodePlan:
    seqs: list


def blocks_needed(num_tokens: int, block_tokens: int) -> int:
    return -(-num_tokens // block_tokens)


def admission_watermark(num_blocks: int) -> int:
    """Blocks kept free at admission so that running sequences can grow before one is preempted."""
    return max(1, num_blocks // 100)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_tokens: int,
        *,
        max_batch_sequences: int,
        max_prefill_tokens: int,
    ):
        self.alloc = allocator
        self.block_tokens = block_tokens
        self.max_batch = max_batch_sequences
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque = deque()
        self.resumed: deque = deque()
        self.running: list = []  # admission order: preemption takes from the end
        self.num_preemptions = 0
        self.watermark = admission_watermark(allocator.num_blocks)

    # ------------------------------------------------------------------ queue

    def add(self, group: PromptGroup) -> None:
        self.waiting.append(group)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.resumed or self.running)

    # ------------------------------------------------------------------ planning

    def _group_blocks(self, group: PromptGroup) -> int:
        n = blocks_needed(len(group.prompt), self.block_tokens)
        partial = len(group.prompt) % self.block_tokens != 0
        return n + (len(group.samples) - 1 if partial else 0)

    def schedule(self) -> Optional[PrefillPlan | DecodePlan]:
        plan = self._plan_prefill()
        if plan is not None:
            return plan
        if self.running:
            self._reserve_decode_slots()
            return DecodePlan(list(self.running))
        return None

    def _plan_prefill(self) -> Optional[PrefillPlan]:
        groups, resumed, tokens = [], [], 0
        seats = self.max_batch - len(self.running)
        while self.resumed and seats > 0:
            seq = self.resumed[0]
            n_tok = len(seq.tokens) - 1
            if (tokens and tokens + n_tok > self.max_prefill_tokens) or not self._resumed_fits(seq):
                break
            self.resumed.popleft()
            seq.blocks = [self.alloc.allocate() for _ in range(blocks_needed(n_tok, self.block_tokens))]
            resumed.append(seq)
            tokens += n_tok
            seats -= 1
        while self.waiting and not self.resumed:
            group = self.waiting[0]
            n_tok = len(group.prompt)
            if len(group.samples) > seats:
                break
            if tokens and tokens + n_tok > self.max_prefill_tokens:
                break
            if not self._group_fits(group, seats):
                need = self._group_blocks(group)
                if not self.running and not groups and not resumed and need > self.alloc.num_free:
                    raise RuntimeError(
                        f"The paged KV cache ({self.alloc.num_blocks} blocks of {self.block_tokens} "
                        f"tokens) cannot hold prompt {group.prompt_index} ({n_tok} tokens x "
                        f"{len(group.samples)} samples, {need} blocks). Raise "
                        f"rollout.kv_memory_fraction (GPU) or rollout.kv_cpu_tokens (CPU)."
                    )
                break
            self.waiting.popleft()
            # Take the blocks now so the next group in this plan sees what is really left.
            group.blocks = [self.alloc.allocate() for _ in range(blocks_needed(n_tok, self.block_tokens))]
            if n_tok % self.block_tokens:
                group.copy_blocks = [self.alloc.allocate() for _ in group.samples[1:]]
            groups.append(group)
            tokens += n_tok
            seats -= len(group.samples)
        if not groups and not resumed:
            return None
        return PrefillPlan(groups, resumed)

    def _resumed_fits(self, seq) -> bool:
        return blocks_needed(len(seq.tokens), self.block_tokens) <= self.alloc.num_free

    def _group_fits(self, group: PromptGroup, seats: int) -> bool:
        return (len(group.samples) <= seats
                and self._group_blocks(group) + self.watermark <= self.alloc.num_free)

    def prefill_ready(self) -> bool:
        """Whether ``schedule`` would plan a prefill now: the first resumed sequence, or else the
        first waiting prompt, has its seats and blocks (the first checks of ``_plan_prefill``)."""
        seats = self.max_batch - len(self.running)
        if self.resumed:
            return seats > 0 and self._resumed_fits(self.resumed[0])
        if self.waiting:
            return self._group_fits(self.waiting[0], seats)
        return False

    def _reserve_decode_slots(self) -> None:
        """Give every running sequence a cache slot for its next token, preempting if needed."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not self.needs_block(seq):
                i += 1
                continue
            try:
                seq.blocks.append(self.alloc.allocate())
                i += 1
            except OutOfBlocks:
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    raise RuntimeError(
                        f"The paged KV cache ({self.alloc.num_blocks} blocks of "
                        f"{self.block_tokens} tokens) cannot hold one sequence of "
                        f"{len(seq.tokens)} tokens. Raise rollout.kv_memory_fraction (GPU) or "
                        f"rollout.kv_cpu_tokens (CPU), or lower rollout.max_new_tokens."
                    ) from None
                self.preempt(victim)

    def needs_block(self, seq) -> bool:
        """Whether ``seq``'s next token starts a new cache block (its blocks are all full)."""
        return seq.num_cached >= len(seq.blocks) * self.block_tokens

    def grow(self, seqs: list) -> None:
        """A cache slot for each of ``seqs``' next tokens, from free blocks only: the caller
        checked that they fit (an overlapped step is running, nobody may be preempted now)."""
        for seq in seqs:
            if self.needs_block(seq):
                seq.blocks.append(self.alloc.allocate())

    # ------------------------------------------------------------------ transitions

    def admit_group(self, group: PromptGroup) -> list[tuple[int, int]]:
        """Fork the prefilled prompt into its samples. Returns (src, dst) block copies to make."""
        copies = []
        prompt_blocks = group.blocks
        last_partial = bool(group.copy_blocks)
        for j, seq in enumerate(group.samples):
            if j == 0:
                seq.blocks = list(prompt_blocks)
            else:
                shared = prompt_blocks[:-1] if last_partial else prompt_blocks
                seq.blocks = [self.alloc.share(b) for b in shared]
                if last_partial:
                    dst = group.copy_blocks[j - 1]
                    copies.append((prompt_blocks[-1], dst))
                    seq.blocks.append(dst)
            seq.num_cached = len(group.prompt)
            self.running.append(seq)
        return copies

    def resume(self, seq: Sequence) -> None:
        seq.num_cached = len(seq.tokens) - 1
        self.running.append(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.alloc.free_all(seq.blocks)
        seq.blocks = []
        seq.bt_len = -1  # new blocks after recompute, maybe as many as before
        seq.num_cached = 0
        self.resumed.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.alloc.free_all(seq.blocks)
        seq.blocks = []

    def finish_many(self, done: list) -> None:
        if not done:
            return
        gone = {id(s) for s in done}
        self.running = [s for s in self.running if id(s) not in gone]
        for s in done:
            self.alloc.free_all(s.blocks)
            s.blocks = []
