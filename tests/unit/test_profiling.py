"""logging.profile_step: one GRPO step under torch.profiler, with named phase ranges, a text
report and a chrome trace; the host-sync-free helpers of the GRPO loss path."""
from __future__ import annotations

import gzip
import json
import os
import traceback

import pytest
import torch

from r1mega.config import ConfigError, load_config, validate
from r1mega.ops.grpo_loss import local_normalizer, local_normalizer_count
from r1mega.rewards.registry import RewardResult, register_reward
from r1mega.train import profiling
from r1mega.train.grpo import samples_to_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1", "data.num_examples=64",
        "data.eval_source=null", "data.global_batch_prompts=4", "rollout.group_size=2",
        "rollout.max_new_tokens=8", "grpo.kl_beta=0.05", "train.sft_steps=0", "train.steps=2",
        "logging.samples_every_steps=0", "logging.tensorboard=false",
        "logging.progress_bar=false", "checkpoint.dir=null"]


@register_reward("test_digit_share_profile")
def _digit_share(completion: str, reference: dict, **context) -> RewardResult:
    return RewardResult(sum(c.isdigit() for c in completion) / max(len(completion), 1), [])


def test_profile_step_writes_the_phase_report_and_a_trace(tmp_path, monkeypatch, capsys):
    from tests.conftest import free_port
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.train.trainer import run_train

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_dir = tmp_path / "run"
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"),
                      TINY + [f"logging.run_dir={run_dir}", "logging.profile_step=2"])
    cfg.rewards.spec = {"arithmetic": {"exact_match": 1.0, "test_digit_share_profile": 0.5}}
    try:
        assert run_train(cfg) == 0
    finally:
        destroy_parallel()
    assert not profiling.active()
    assert sorted(os.listdir(run_dir / "profile")) == ["step2.json.gz", "step2.txt"]
    report = (run_dir / "profile" / "step2.txt").read_text()
    for name in ("step", "rollout", "reward", "logprobs", "train", "metrics", "forward_backward",
                 "model_forward", "loss", "finalize_grads", "optimizer_step", "micro_batches"):
        assert f"r1mega/{name} " in report, name
    assert "top 40 ops by self CPU time" in report and "aten::" in report
    assert "(d) device -> host synchronisations" in report
    table = report.split("(a) ranges")[1].split("(b) top")[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:] if line.strip()}
    assert set(rows) >= {"r1mega/step", "r1mega/rollout", "r1mega/train"}
    assert int(rows["r1mega/train"][1]) == 1 and float(rows["r1mega/train"][2]) > 0
    # The chrome trace loads and is small for a tiny step.
    trace = run_dir / "profile" / "step2.json.gz"
    assert os.path.getsize(trace) < 20 * 2**20
    with gzip.open(trace, "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"r1mega/rollout", "r1mega/reward", "r1mega/logprobs", "r1mega/train"} <= names
    out = capsys.readouterr().out
    assert "profile of step 2" in out and str(run_dir / "profile" / "step2.txt") in out
    # Only step 2 was profiled; both steps were logged.
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert steps == [1, 2]


def test_ranges_cost_nothing_when_off():
    assert not profiling.active()
    assert profiling.prange("train") is profiling.prange("rollout")  # one shared no-op context
    with profiling.prange("train"):
        pass


def test_only_the_chosen_step_on_rank_0_is_profiled(tmp_path):
    calls = []

    def step_fn(step):
        calls.append((step, profiling.active()))
        return {"step": step}

    assert profiling.StepProfiler(0, str(tmp_path)).wrap(step_fn) is step_fn
    assert profiling.StepProfiler(2, str(tmp_path), rank=1).wrap(step_fn) is step_fn
    wrapped = profiling.StepProfiler(2, str(tmp_path), log=lambda text: None).wrap(step_fn)
    assert [wrapped(s) for s in (1, 2, 3)] == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert calls == [(1, False), (2, True), (3, False)]
    assert sorted(os.listdir(tmp_path / "profile")) == ["step2.json.gz", "step2.txt"]


def test_negative_profile_step_is_rejected():
    with pytest.raises(ConfigError, match="logging.profile_step must be >= 0"):
        validate(load_config(None, ["logging.profile_step=-1"]))
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["logging.profile_step=1.5"])
    assert validate(load_config(None, ["logging.profile_step=3"])).logging.profile_step == 3


def test_sync_sites_are_counted_by_call_site():
    sites = profiling.SyncSites(enabled=False)
    for _ in range(3):
        sites.record(traceback.extract_stack())
    assert list(sites.sites.values()) == [3]
    assert "test_profiling.py" in next(iter(sites.sites))


@pytest.mark.parametrize("loss_agg",
                         ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_normalizer_count_against_a_plain_count(loss_agg):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 9, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        mask = (torch.rand(int(lengths.sum()), generator=g) > 0.6).float()
        active = mask.tolist()
        if loss_agg == "token_mean":
            want = sum(a > 0 for a in active)
        else:  # sequences with at least one active token, counted by hand
            bounds = [0] + torch.cumsum(lengths, 0).tolist()
            want = sum(any(a > 0 for a in active[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:]))
            want *= 7 if loss_agg == "seq_mean_token_sum_norm" else 1
        got = local_normalizer_count(mask, loss_agg=loss_agg, seq_ids=seq_ids, num_seqs=len(lengths),
                                     norm_tokens=7)
        assert got.dtype == torch.int32 and got.dim() == 0 and int(got) == want
        # the float face takes any ids (here not 0..n-1)
        assert local_normalizer(mask, loss_agg=loss_agg, seq_ids=seq_ids * 3 + 5, norm_tokens=7) == want


def test_samples_to_host_is_one_copy_with_the_same_values():
    values = [torch.randn(3), None, torch.randn(5), torch.randn(1)]
    out = samples_to_host(values)
    assert out[1] is None
    for got, want in zip(out, values):
        if want is not None:
            assert got.device.type == "cpu" and torch.equal(got, want)
    assert samples_to_host([None, None]) == [None, None]


def test_sync_warnings_are_caught_by_site_and_not_shown(monkeypatch, recwarn):
    """The CUDA path, with the sync-debug switch stubbed: torch reports a synchronising op as a
    UserWarning; inside SyncSites it is counted by call site, other warnings pass through."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with profiling.SyncSites(enabled=True) as sites:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    assert modes == ["warn", 0]
    assert list(sites.sites.values()) == [2]
    assert "test_sync_warnings_are_caught_by_site_and_not_shown" in next(iter(sites.sites))
    assert [str(w.message) for w in recwarn] == ["something else"]


def _event(name, start, end, *, thread=1, parent=None, kernels=(), device="CPU"):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           thread=thread, cpu_parent=parent, kernels=list(kernels),
                           device_type=SimpleNamespace(name=device))


def test_range_rows_attribute_ops_kernels_and_syncs_by_time():
    """Synthetic CUDA-like events: ranges nest by time on their thread; ops, kernels and syncs on
    any thread count for every range open when they start."""
    from types import SimpleNamespace

    k = lambda ms: SimpleNamespace(name="k", device=0, duration=ms * 1e3)  # noqa: E731
    step = _event("r1mega/step", 0, 10_000)
    train = _event("r1mega/train", 1_000, 9_000)
    fb = _event("r1mega/forward_backward", 2_000, 6_000)
    mm = _event("aten::mm", 2_100, 2_200, kernels=[k(0.5)])
    launch = _event("cudaLaunchKernel", 2_150, 2_160, parent=mm)
    bwd = _event("aten::mm", 3_000, 3_100, thread=2, kernels=[k(1.0), k(0.25)])  # autograd thread
    read = _event("aten::item", 4_000, 4_500)
    dense = _event("aten::_local_scalar_dense", 4_010, 4_490, parent=read)
    sync = _event("cudaStreamSynchronize_v3020", 4_020, 4_480, parent=dense)
    opt = _event("aten::add_", 7_000, 7_010, kernels=[k(2.0)])
    gpu = _event("r1mega/train", 1_100, 8_000, device="CUDA")  # the device-side annotation
    rows = {r["path"]: r for r in profiling.range_rows(
        [step, train, fb, mm, launch, bwd, read, dense, sync, opt, gpu])}
    assert list(rows) == [("r1mega/step",), ("r1mega/step", "r1mega/train"),
                          ("r1mega/step", "r1mega/train", "r1mega/forward_backward")]
    f = rows[("r1mega/step", "r1mega/train", "r1mega/forward_backward")]
    assert (f["depth"], f["calls"], f["wall_ms"]) == (2, 1, 4.0)
    assert f["kernels"] == 3 and f["device_ms"] == 1.75
    assert (f["ops"], f["host_reads"], f["syncs"]) == (3, 1, 1) and f["sync_ms"] == 0.46
    t = rows[("r1mega/step", "r1mega/train")]
    assert t["kernels"] == 4 and t["device_ms"] == 3.75 and t["ops"] == 4
    assert t["wall_ms"] - t["child_ms"] == 4.0  # train's own time outside forward_backward
    table = profiling.format_range_table(list(rows.values()), device=True)
    assert "    r1mega/forward_backward" in table and "kernel ms" in table


def test_metric_sums_equal_per_metric_float64_accumulation():
    """TrainStep's packed accumulation is bit for bit the per-metric one it replaced, including
    mixed dtypes, -0.0 and a micro-batch that brings a new metric."""
    from r1mega.train.step import MetricSums

    g = torch.Generator().manual_seed(0)
    batches = [{"loss_sum": torch.randn((), generator=g) * 1e3,
                "num_tokens": torch.tensor(7 + i, dtype=torch.int32),
                "entropy_sum": torch.rand((), generator=g, dtype=torch.float64),
                "clip_frac_low_sum": torch.tensor(-0.0)} for i in range(4)]
    batches[3]["extra_sum"] = torch.tensor(2.5)
    sums, ref = MetricSums(), {}
    for b in batches:
        sums.add(b)
        for k, v in b.items():
            ref[k] = ref.get(k, 0.0) + v.detach().double()
    got = sums.as_dict()
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].dtype == torch.float64 and got[k].item() == ref[k].item(), k
        assert str(got[k].item()) == str(ref[k].item())  # the sign of zero too
    assert MetricSums().as_dict() == {}
