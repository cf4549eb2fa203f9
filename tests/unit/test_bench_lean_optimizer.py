"""`r1mega bench train-step --master-weights/--moments-dtype`: the lean-optimizer row runs in the
--smoke mode on CPU (MoE shape: bf16 experts beside the fp32 router) and reports its state size."""
from __future__ import annotations

import math

from tests.unit.test_bench_train_step import _run_smoke


def test_moe_smoke_times_a_lean_optimizer_row():
    out = _run_smoke("--model", "qwen3-moe-small", "--hf-experts", "default",
                     "--master-weights", "bf16_remainder", "--moments-dtype", "bf16")
    rows = out["impls"]
    lean = [k for k in rows if "bf16_remainder" in k]
    assert len(lean) == 1, sorted(rows)
    row = rows[lean[0]]
    # bf16 weight + bf16 grad + int16 remainder + two bf16 moments.
    assert row["bytes_per_param_static"] == 10
    assert abs(row["first_loss"] - math.log(256)) < 0.2 and math.isfinite(row["last_loss"])
    assert row["ms_per_step"] > 0
