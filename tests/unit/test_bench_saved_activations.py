"""`r1mega bench saved-activations`: the counter against a hand count, and the --smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from r1mega.bench.saved_activations import count_saved

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_counter_sees_each_saved_storage_once_and_no_parameters():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8, requires_grad=True)
    seen = count_saved(layer, lambda: layer(x).sum().backward())
    # Linear 1 saves x (5x8), ReLU its output (5x16), Linear 2 that same output: 2 storages.
    assert sorted(b for b, _, _ in seen.values()) == [5 * 8 * 4, 5 * 16 * 4]


def test_smoke_reports_both_models():
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "bench", "saved-activations", "--smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["impls"]) == 2 and out["r1mega_vs_transformers"] > 0
    for row in out["impls"].values():
        assert row["bytes_per_token_per_layer"] > 0 and row["largest"]
