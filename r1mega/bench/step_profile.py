"""Where a training step's device time goes: CUDA kernels by kind (from a profiler trace) and
the optimizer part of each step (from CUDA events), for ``r1mega bench train-step``."""
from __future__ import annotations

import torch

# Device kernels by kind, first match wins (lower-case substrings of the kernel name). The MoE
# dispatch kernels are csrc/moe_dispatch_kernel.cu's; torch._grouped_mm's CUTLASS kernels carry
# "group" (GroupProblemShape / grouped) in their names.
_KERNEL_KINDS = (
    ("moe dispatch", ("routing_metadata_kernel", "permute_kernel")),
    ("grouped gemm", ("group",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("copy / cast", ("copy", "cast", "convert", "fill")),
    ("softmax / loss / reduce", ("softmax", "nll", "cross_entropy", "reduce", "topk", "sort",
                                 "scan", "cumsum", "bincount", "histogram")),
    ("elementwise", ("elementwise", "vectorized", "silu", "swiglu", "mul", "add")),
)


def kernel_breakdown(events) -> dict:
    """{kind: ms} of the CUDA kernels in ``events`` (profiler key averages), plus "total"."""
    from torch.autograd import DeviceType

    out: dict = {}
    for e in events:
        # record_function ranges (Optimizer.step#...) also carry device time: the kernels
        # inside them, counted already.
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        name = e.key.lower()
        kind = next((k for k, subs in _KERNEL_KINDS if any(s in name for s in subs)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1e3
    out["total"] = sum(out.values())
    return out


class OptimizerClock:
    """Device time of the optimizer part of each step (clip, Adam, weight copies), from CUDA
    events around it: recording an event does not wait, so the timed loop stays sync-free. The
    share of the step the optimizer takes is what a model with many more total than active
    parameters pays for its fp32 optimizer state."""

    def __init__(self, device):
        self.on = device.type == "cuda"
        self.pairs: list = []
        self.result_ms = float("nan")  # mean over the timed steps, set by _timed

    def wrap(self, fn):
        if not self.on:
            return fn

        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.pairs.append((start, end))
            return out
        return timed

    def reset(self) -> None:
        self.pairs.clear()

    def mean_ms(self) -> float:
        if not self.pairs:
            return float("nan")
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs) / len(self.pairs)
