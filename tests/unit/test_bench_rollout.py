"""`r1mega bench rollout --smoke` runs end to end on CPU for a dense and the MoE shape and ends in
one JSON line; for the MoE shape that line carries the log-prob mismatch with and without routing
replay. The transformers peer of a named shape is the same model: same class family, same
parameter count as r1mega's."""
from __future__ import annotations

import json

import pytest
import torch

from tests.distributed.harness import free_port


@pytest.mark.slow  # ~10 s of CPU each; over 20 s of wall time on a loaded 2-core box
@pytest.mark.parametrize("model", ["852m", "qwen3-moe-small"])
def test_smoke_prints_one_json_line(model, capsys, monkeypatch):
    from r1mega.bench import rollout

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert rollout.main(["--smoke", "--model", model]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "rollout" and out["model"] == model
    assert set(out["settings"]) == {"4x8->8", "2x8->16"}
    # fp32 on CPU: the rollout's log-probs are the training forward's up to summation order
    assert out["logprob_mismatch_max"] < 1e-4
    keys = {k for k in out if k.startswith("logprob_mismatch_replay")}
    if model == "852m":
        assert out["bar_ratio"] == 20.0 and not keys and "route_flip_fraction" not in out
    else:
        assert out["bar_ratio"] == 15.0
        assert keys == {f"logprob_mismatch_replay_{s}_{m}" for s in ("on", "off") for m in ("mean", "max")}
        assert out["logprob_mismatch_replay_on_max"] < 1e-4
        assert 0.0 <= out["route_flip_fraction"] < 0.05  # fp32 on CPU: (almost) no flips


@pytest.mark.slow  # two modes of the smoke: ~20 s on a loaded 2-core box
def test_smoke_with_fp8_kv_mode(capsys, monkeypatch):
    """--kv-fp8: the fp8kv mode beside the default in the same run, with its own roofline bytes,
    speed ratio and log-prob mismatch (e4m3 K/V: above the fp32 default's, still small)."""
    from r1mega.bench import rollout

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert rollout.main(["--smoke", "--kv-fp8", "--mismatch-seqs", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for setting in ("4x8->8", "2x8->16"):
        assert set(out["settings"][setting]) == {"sync", "fp8kv"}
        assert out["fp8kv_speedup"][setting] > 0
    assert out["logprob_mismatch_max"] < 1e-4
    assert out["logprob_mismatch_max"] < out["logprob_mismatch_fp8kv_max"] < 0.1


@pytest.mark.parametrize("model,peer", [("852m", "LlamaForCausalLM"), ("qwen3-moe-small", "Qwen3MoeForCausalLM")])
def test_peer_has_the_same_shape(model, peer, single_rank_runtime):
    from r1mega.bench.rollout import hf_peer
    from r1mega.bench.shapes import get_shape
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    mcfg = ModelConfig(**get_shape(model, smoke=True))
    hf = hf_peer(mcfg)
    ours = build_model(mcfg, single_rank_runtime(), wrap=False)[0]
    assert type(hf).__name__ == peer
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())
    with torch.no_grad():
        hf(torch.tensor([[1, 2, 3]]))  # it runs


@pytest.mark.slow  # two modes of the smoke: ~20 s on a loaded 2-core box
def test_profile_kernels_lists_each_modes_prefill(capsys, monkeypatch):
    """--profile-kernels prints a prefill's top operators for the default and the exact mode,
    and the profiled prefill changes no timed result (the exact gap stays 0)."""
    from r1mega.bench import rollout

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert rollout.main(["--smoke", "--exact", "--profile-kernels", "--settings", "4x8x8",
                         "--mismatch-seqs", "2"]) == 0
    text = capsys.readouterr().out
    for mode in ("sync", "exact"):
        head = f"---- {mode} prefill of 4 prompts: top kernels"
        assert head in text
        table = text.split(head, 1)[1]
        assert "aten::mm" in table.split("Self CPU time total", 1)[0]
    out = json.loads(text.strip().splitlines()[-1])
    assert out["exact"]["logprob_gap"]["max_abs_diff"] == 0.0


def test_interval_union_counts_overlaps_once_and_long_gaps():
    from r1mega.bench.rollout import interval_union

    # [0,10] and [5,12] overlap (12 busy), a 3-unit gap (short), [15,20], a 30-unit gap, [50,51]
    # nested inside nothing, and [16,18] inside [15,20]
    spans = sorted([(0, 10), (5, 12), (15, 20), (16, 18), (50, 51)])
    busy, span, idle = interval_union(spans, min_gap=20)
    assert (busy, span, idle) == (12 + 5 + 1, 51, 30)
    assert interval_union(spans, min_gap=0) == (18, 51, 33)
    assert interval_union([], min_gap=20) == (0.0, 0.0, 0.0)


def test_idle_before_names_the_kernel_after_each_long_gap():
    from r1mega.bench.rollout import idle_before

    # gaps: 2 (short) before b, 30 before c (after a's nested d ends at 12), 25 before c again,
    # 40 before a
    named = sorted([(0, 10, "a"), (5, 12, "d"), (14, 20, "b"), (50, 60, "c"), (85, 90, "c"),
                    (130, 131, "a")])
    assert idle_before(named, min_gap=20) == {"a": [1, 40.0], "c": [2, 55.0]}
    assert list(idle_before(named, min_gap=20, top=1)) == ["c"]
    assert idle_before([], min_gap=20) == {}
