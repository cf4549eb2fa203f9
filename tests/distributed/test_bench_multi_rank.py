"""The multi-rank benchmarks' --smoke runs on 2 CPU ranks (the harness sets torchrun's variables):
`r1mega bench rollout-tp` at TP=2 and `r1mega bench train-scale` at PP=2 (tools/gpu_multi.sh's
dry run covers DP, EP and TP with sequence parallelism). Rank 0 prints one JSON line last."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from tests.distributed.harness import run_ranks


def _bench(rank, world, name, argv):
    import importlib

    from r1mega.bench import BENCHMARKS

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = importlib.import_module(BENCHMARKS[name]).main(argv)
    return rc, buf.getvalue()


def _json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # two spawned ranks building megatron models: ~20 s on a loaded 2-core box
def test_rollout_tp2_smoke():
    (rc0, out0), (rc1, out1) = run_ranks(_bench, 2, args=("rollout-tp", ["--smoke"]))
    assert rc0 == rc1 == 0
    assert out1 == ""  # rank 0 prints
    r = _json(out0)
    assert r["bench"] == "rollout-tp" and r["tp"] == 2 and r["ranks_agree"] and r["all_tokens"]
    assert r["new_tokens"] == 4 * 8 and r["tokens_per_s"] > 0
    assert r["cpu_mode"] is True and r["device"] == "cpu"  # gloo ranks; on GPUs it reads false


@pytest.mark.slow
def test_train_scale_pp2_smoke():
    (rc0, out0), (rc1, _) = run_ranks(_bench, 2, args=("train-scale", ["--smoke", "--pipeline", "2",
                                                                         "--label", "pp2"]))
    assert rc0 == rc1 == 0
    r = _json(out0)
    assert (r["world_size"], r["dp"], r["tp"], r["pp"], r["label"]) == (2, 1, 1, 2, "pp2")
    assert r["micro_seqs"] == 1  # one sequence per micro-batch under PP: the pipeline fills
    assert r["losses_finite"] and r["tokens_per_step"] == 2 * 64
