"""`r1mega bench fp8 --smoke` and `r1mega bench train-step --smoke --fp8` run end to end on the
CPU (FP8 emulated) and end with one JSON line holding the figures the GPU run reports."""
from __future__ import annotations

import json

import pytest
import torch


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_fp8_smoke_throughput_and_parity(capsys):
    from r1mega.bench import fp8

    assert fp8.main(["--smoke", "--models", "852m", "--recipe", "tensorwise"]) == 0
    out = _last_json(capsys)
    row = out["models"]["852m"]
    assert set(row["rows"]) == {"bf16", "fp8-tensorwise"} and row["fp8_speedup"] > 0
    assert out["dual_quantizer"] == "triton"   # R1MEGA_FP8_QUANT's default, named in the result
    assert fp8.main(["--smoke", "--parity"]) == 0
    out = _last_json(capsys)
    assert out["mode"] == "parity" and set(out["final_loss"]) == {"bf16", "fp8-blockwise"}
    # the two runs start from the same weights on the same corpus
    assert out["first_loss"]["bf16"] == pytest.approx(out["first_loss"]["fp8-blockwise"], rel=1e-2)


def test_bench_fp8_parity_noise_floor_trains_bf16_twice_from_the_same_weights(capsys):
    from r1mega.bench import fp8

    assert fp8.main(["--smoke", "--parity", "--noise-floor", "--recipe", "tensorwise"]) == 0
    out = _last_json(capsys)
    assert set(out["final_loss"]) == {"bf16", "fp8-tensorwise", "bf16-again"}
    # one process on the CPU: the second bf16 run repeats the first bit for bit
    assert out["final_loss"]["bf16-again"] == out["final_loss"]["bf16"]
    assert out["bf16_vs_bf16_relative_difference"] == 0.0


@pytest.mark.parametrize("rows_flag", ["all", "--no-fp8-kv", "--skip-weights-only"])
def test_bench_fp8_rollout_smoke_rows(capsys, rows_flag):
    from r1mega.bench import fp8

    kv_row = rows_flag != "--no-fp8-kv"
    assert fp8.main(["--smoke", "--rollout", "--recipe", "tensorwise", "--mismatch-seqs", "2"]
                    + ([] if rows_flag == "all" else [rows_flag])) == 0
    out = _last_json(capsys)
    names = ({"bf16"} | ({"fp8-tensorwise+fp8kv"} if kv_row else set())
             | (set() if rows_flag == "--skip-weights-only" else {"fp8-tensorwise"}))
    assert set(out["rows"]) == names
    # a CPU smoke decodes eagerly: nothing compiled, so no graph was broken
    assert all(r["decode_compiled"] is False and r["graph_breaks"] == 0 for r in out["rows"].values())
    assert (out["fp8_kv_speedup"] is None) == (not kv_row)
    if rows_flag == "--skip-weights-only":
        assert out["fp8_speedup"] is None and out["bar_met"] is None
        return
    # FP8 weights move the rollout's log-probs away from the bf16 training forward's
    rows = out["rows"]
    assert rows["fp8-tensorwise"]["logprob_mismatch_mean"] > 10 * rows["bf16"]["logprob_mismatch_mean"]


def test_bigram_corpus_is_fixed_and_follows_its_table():
    from r1mega.bench.fp8 import BigramCorpus

    a, b = BigramCorpus(300, seed=3), BigramCorpus(300, seed=3)
    x, y = a.batch(2, 50), b.batch(2, 50)
    assert (x == y).all() and x.max() < 300
    for s in x:
        for t in range(1, 50):
            assert int(s[t]) in a.next[s[t - 1]].tolist()


def test_train_step_bench_fp8_flag_smoke(capsys):
    from r1mega.bench import train_step

    assert train_step.main(["--smoke", "--skip-hf", "--fp8", "rowwise"]) == 0
    out = _last_json(capsys)
    assert any("fp8-rowwise" in k for k in out["impls"]) and out["fp8_speedup"] > 0


def test_bench_rollout_fp8_smoke(capsys):
    from r1mega.bench import rollout

    assert rollout.main(["--smoke", "--fp8", "tensorwise", "--mismatch-seqs", "2", "--profile-kernels"]) == 0
    out = _last_json(capsys)
    assert out["mode"] == "rollout"
    assert set(out["rows"]) == {"bf16", "fp8-tensorwise", "fp8-tensorwise+fp8kv"}
    fp8 = out["rows"]["fp8-tensorwise"]
    # FP8 weights move the rollout's log-probs away from the (unchanged) training forward's
    assert fp8["logprob_mismatch_mean"] > out["rows"]["bf16"]["logprob_mismatch_mean"]
    assert out["fp8_kv_speedup"] > 0 and out["bar_met_with_fp8_kv"] is None  # smoke: no bar
    assert out["rows"]["fp8-tensorwise+fp8kv"]["logprob_mismatch_mean"] > out["rows"]["bf16"]["logprob_mismatch_mean"]


def test_bench_fp8_te_backend_rows_and_refusals():
    """--backend te: r1mega's bf16 row stays on the local spec (model.spec=auto would switch to
    TE's wherever TE imports), a bf16 row on TE's spec and TE's FP8 row beside it; recipes of
    the other backend and the rollout / CPU smoke modes are refused with the fix."""
    from r1mega.bench import fp8

    rows = fp8._precisions("current", torch.device("cuda"), backend="te")
    assert list(rows) == ["bf16", "te-bf16", "fp8-current"]
    assert [spec for _, spec in rows.values()] == ["local", "te", "te"]
    prec = rows["fp8-current"][0]
    assert prec.fp8 and prec.fp8_backend == "te" and prec.fp8_recipe == "current" and not prec.fp8_emulate
    native = fp8._precisions("tensorwise", torch.device("cpu"))
    assert [spec for _, spec in native.values()] == ["local", "local"]
    assert native["fp8-tensorwise"][0].fp8_emulate
    for argv, msg in ((["--backend", "te", "--recipe", "tensorwise"], "not a te recipe"),
                      (["--recipe", "current"], "not a native recipe"),
                      (["--backend", "te", "--recipe", "current", "--rollout"], "throughput and parity")):
        with pytest.raises(SystemExit, match=msg):
            fp8.main(argv)


def test_fp8_decode_gemm_bench_smoke(capsys):
    """`r1mega bench fp8-decode-gemm --smoke`: every route on the CPU (FP8 emulated; the fused
    Triton route needs the interpreter, so it is left out here), errors against the float32
    product of the unquantised operands within e4m3's few per cent, bf16's exactly 0 on CPU."""
    from r1mega.bench import fp8_decode_gemm

    assert fp8_decode_gemm.main(["--smoke"]) == 0
    out = _last_json(capsys)
    routes = out["routes"]
    assert set(routes) == {"bf16", "tensorwise+quantize", "rowwise+quantize", "blockwise+quantize",
                           "tensorwise+lt", "tensorwise-row", "tensorwise-row+lt"}
    assert out["lt_timings_ms"] == {}  # cuBLASLt serves CUDA operands only: the +lt rows ran torch's path
    assert routes["bf16"]["5"]["max_rel_err"] == 0.0
    for name, r in routes.items():
        assert r["5"]["ms"] > 0
        if name != "bf16":
            assert 1e-3 < r["5"]["max_rel_err"] < 0.1, name


def test_bench_fp8_train_env_rows_run_with_their_switches_alone(capsys, monkeypatch):
    import os

    from r1mega.bench import fp8, train_step

    seen, real = [], train_step.run_r1mega

    def spy(*a, **kw):
        seen.append(os.environ.get("R1MEGA_FP8_WEIGHT_AMAX"))
        return real(*a, **kw)

    monkeypatch.delenv("R1MEGA_FP8_WEIGHT_AMAX", raising=False)
    monkeypatch.setattr(train_step, "run_r1mega", spy)
    assert fp8.main(["--smoke", "--models", "852m", "--recipe", "tensorwise",
                     "--train-env", "R1MEGA_FP8_WEIGHT_AMAX=1", "--fp8-again"]) == 0
    row = _last_json(capsys)["models"]["852m"]
    names = ["bf16", "fp8-tensorwise", "fp8-tensorwise+R1MEGA_FP8_WEIGHT_AMAX=1", "fp8-tensorwise-again"]
    assert list(row["rows"]) == names and seen == [None, None, "1", None]
    assert set(row["extra_speedups"]) == set(names[2:])
    assert "R1MEGA_FP8_WEIGHT_AMAX" not in os.environ
    with pytest.raises(SystemExit, match="R1MEGA_NAME=VALUE"):
        fp8.main(["--smoke", "--models", "852m", "--recipe", "tensorwise", "--train-env", "AMAX=1"])


def test_rollout_variant_rows_set_their_switches_for_the_row_alone(monkeypatch):
    """--variant: a module switch overridden, or an R1MEGA_... variable set, inside the row only."""
    import os

    from r1mega.bench.fp8 import _variant
    from r1mega.ops import deepgemm_blockwise
    from r1mega.precision import triton_fp8_rows

    monkeypatch.delenv("R1MEGA_FP8_BLOCKWISE_GEMM", raising=False)
    before = triton_fp8_rows.MULTI_ROW
    with _variant("blockwise-cublas"):
        assert deepgemm_blockwise.choice() == "cublas"
    assert "R1MEGA_FP8_BLOCKWISE_GEMM" not in os.environ and deepgemm_blockwise.choice() == "auto"
    with _variant("rows-multi"):
        assert triton_fp8_rows.MULTI_ROW is True
    assert triton_fp8_rows.MULTI_ROW == before
