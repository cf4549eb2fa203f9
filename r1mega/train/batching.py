"""Micro-batches by token budget: sequences packed end to end (THD), same count on every DP rank.

A *sample* is a dict of tensors with one row per token (1-D, or (T, ...) such as the MoE routes
of routing replay); ``input_ids`` (1-D) is required,
everything else (``labels``, ``loss_mask``, ``advantages``, ``old_logprobs`` ...) rides along and
reaches the loss function packed the same way. Packing is first-fit decreasing, so a micro-batch
holds at most ``micro_batch_tokens`` real tokens (plus alignment padding).

Every DP rank must run the same number of micro-batches (the schedules and the DP gradient
reduction are collective), so the count is agreed with an all-reduce MAX over the DP group and
short ranks run *empty* micro-batches: one padding sequence whose ``loss_mask`` is zero. Padding
is its own sequence in the pack, so it never attends to (or is attended by) real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from r1mega.models.attention import PackedSeqs, make_packed_seqs


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (1, T) int64
    fields: dict  # name -> (T, ...) tensor, packed like input_ids (padding: zeros)
    seq_lengths: tuple  # lengths of the packed sequences, padding sequence included
    # Position in the caller's sample list of each packed sequence; -1 for padding.
    sample_index: tuple
    packed: PackedSeqs = field(repr=False, default=None)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device) -> "MicroBatch":
        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            {k: v.to(device, non_blocking=True) for k, v in self.fields.items()},
            self.seq_lengths, self.sample_index, make_packed_seqs(self.seq_lengths, device),
        )


def check_samples(samples: Sequence[dict], micro_batch_tokens: int) -> None:
    """Raise naming the sample and key when a sample cannot be packed."""
    for i, s in enumerate(samples):
        if "input_ids" not in s:
            raise ValueError(f"sample {i}: missing 'input_ids' (keys: {sorted(s)}).")
        n = int(s["input_ids"].numel())
        if n == 0:
            raise ValueError(f"sample {i}: empty 'input_ids'; drop empty sequences before packing.")
        if n > micro_batch_tokens:
            raise ValueError(
                f"sample {i} has {n} tokens > data.micro_batch_tokens={micro_batch_tokens}; raise "
                f"data.micro_batch_tokens to at least {n} or shorten the sequence.")
        for k, v in s.items():
            if v.dim() < 1 or v.shape[0] != n or (k == "input_ids" and v.dim() != 1):
                raise ValueError(f"sample {i}: field '{k}' has shape {tuple(v.shape)}, expected "
                                 f"({n}, ...): one row per token of input_ids.")


def pack_first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= budget; first-fit decreasing (stable order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def _pad_sample(template_fields: dict, n: int) -> dict:
    return {k: torch.zeros((n, *v.shape[1:]), dtype=v.dtype) for k, v in template_fields.items()}


def collate(samples: Sequence[dict], indices: Sequence[int], pad_to_multiple: int,
            template: Optional[dict] = None, exact_tokens: int = 0) -> MicroBatch:
    """Pack ``samples[indices]`` end to end; append one padding sequence to reach the multiple
    (or exactly ``exact_tokens`` when given)."""
    chosen = [samples[i] for i in indices]
    template = template or (chosen[0] if chosen else {"input_ids": torch.zeros(1, dtype=torch.long)})
    lengths = [int(s["input_ids"].numel()) for s in chosen]
    total = sum(lengths)
    pad = (-total) % pad_to_multiple if total else pad_to_multiple
    if exact_tokens:
        pad = exact_tokens - total
    parts = list(chosen)
    index = list(indices)
    if pad:
        parts.append(_pad_sample(template, pad))
        lengths.append(pad)
        index.append(-1)
    keys = [k for k in template if k != "input_ids"]
    for i, s in zip(index, parts):
        missing = [k for k in keys if k not in s]
        if missing:
            raise ValueError(f"sample {i}: missing field(s) {missing} that other samples have.")
    ids = torch.cat([s["input_ids"].long() for s in parts]).unsqueeze(0)  # (1, T)
    fields = {k: torch.cat([s[k] for s in parts]) for k in keys}  # (T,) each
    return MicroBatch(ids, fields, tuple(lengths), tuple(index))


def _field_spec(samples: Sequence[dict]) -> Optional[dict]:
    return ({k: (str(v.dtype).replace("torch.", ""), tuple(v.shape[1:])) for k, v in samples[0].items()}
            if samples else None)


def agree_count(count: int, dp_group, device, samples: Sequence[dict] = ()) -> tuple[int, Optional[dict]]:
    """(MAX of ``count`` over the DP group, a field spec from some rank that has samples).

    Every rank must run as many micro-batches; a rank without samples (e.g. after dropping
    equal-reward groups) learns the field names and dtypes of its empty micro-batches from
    the others, so that the loss function finds the fields it expects.
    """
    spec = _field_spec(samples)
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return count, spec
    gathered: list = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(gathered, (count, spec), group=dp_group)
    specs = [s for _, s in gathered if s is not None]
    return max(c for c, _ in gathered), (spec or (specs[0] if specs else None))


def make_micro_batches(samples: Sequence[dict], micro_batch_tokens: int, *, dp_group=None,
                       device="cpu", pad_to_multiple: int = 1, count_multiple: int = 1,
                       min_count: int = 1, fixed_size: bool = False) -> list[MicroBatch]:
    """This rank's samples -> packed micro-batches on ``device``, as many as on every DP rank.

    ``pad_to_multiple``: tokens per micro-batch rounded up (TP size under sequence parallelism).
    ``count_multiple``: micro-batch count rounded up (PP size for the interleaved schedule).
    ``fixed_size``: every micro-batch padded to ``micro_batch_tokens`` (rounded to the multiple).
    """
    check_samples(samples, micro_batch_tokens)
    lengths = [int(s["input_ids"].numel()) for s in samples]
    bins = pack_first_fit(lengths, micro_batch_tokens)
    count, spec = agree_count(max(len(bins), min_count), dp_group, device, samples)
    count = -(-count // count_multiple) * count_multiple
    template = samples[0] if samples else (
        {k: torch.zeros((1, *rest), dtype=getattr(torch, d)) for k, (d, rest) in spec.items()}
        if spec else None)
    bins += [[] for _ in range(count - len(bins))]
    exact = -(-micro_batch_tokens // pad_to_multiple) * pad_to_multiple if fixed_size else 0
    return [collate(samples, b, pad_to_multiple, template, exact).to(device) for b in bins]


def unpack_per_sample(values: Sequence[torch.Tensor], micro_batches: Sequence[MicroBatch],
                      num_samples: int) -> list[torch.Tensor]:
    """Per-token results of each micro-batch ((T,) each) -> one tensor per original sample."""
    out: list = [None] * num_samples
    for v, mb in zip(values, micro_batches):
        for piece, idx in zip(torch.split(v, list(mb.seq_lengths)), mb.sample_index):
            if idx >= 0:
                out[idx] = piece
    return out
