"""Where training numbers go: tensorboard, a JSONL log, one console line per step, a progress bar.

Only rank 0 writes. Metrics arrive already reduced over ranks (the trainer owns the reductions);
this module only formats and stores them.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

# The console line shows these, in this order, when present; everything goes to tensorboard.
CONSOLE_KEYS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/accuracy", "acc", "{:.2f}"),
    ("reward/strict_accuracy", "strict", "{:.2f}"),
    ("reward/format_rate", "fmt", "{:.2f}"),
    ("response/length_mean", "len", "{:.1f}"),
    ("loss", "loss", "{:.4f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "ent", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("lr", "lr", "{:.2e}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
    ("time/step_s", "step_s", "{:.2f}"),
)


class MetricsLogger:
    def __init__(self, logging_cfg, rank: int = 0, total_steps: Optional[int] = None,
                 desc: str = "train"):
        self.cfg = logging_cfg
        self.enabled = rank == 0
        self.run_dir = logging_cfg.run_dir
        self.tb_dir = os.path.join(self.run_dir, "tensorboard")
        self._writer = None
        self._jsonl = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")
        if logging_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.tb_dir)
        if logging_cfg.progress_bar and total_steps:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=not sys.stderr.isatty())

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {}
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            clean[prefix + key] = value
            if self._writer is not None and math.isfinite(value):
                self._writer.add_scalar(prefix + key, value, step)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()

    def console(self, step: int, metrics: dict, total_steps: Optional[int] = None) -> None:
        if not self.enabled:
            return
        parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
        for key, short, fmt in CONSOLE_KEYS:
            if key in metrics:
                try:
                    parts.append(f"{short}={fmt.format(float(metrics[key]))}")
                except (TypeError, ValueError):
                    pass
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.write(line)
        else:
            print(line, flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        if self._writer is not None:
            # Markdown code block keeps tensorboard from eating <think>/<answer> as HTML.
            self._writer.add_text(tag, "```\n" + text + "\n```", step)
            self._writer.flush()
        self._jsonl.write(json.dumps({"step": step, "text_tag": tag, "text": text}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self._writer = self._jsonl = self._bar = None


def memory_metrics() -> dict:
    import psutil
    import torch

    out = {"memory/host_rss_gb": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/gpu_allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        out["memory/gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out
