"""The sync-free optimizer step (r1mega/train/device_step.py) against megatron's host path.

Both paths run the real TrainStep on a real megatron model (CPU, gloo). The sync-free path
needs fused Adam, which GPU runs get from build_optimizer; here it is switched on for the CPU
(torch has a CPU fused AdamW with the same grad_scale/found_inf arguments). The reference is
the host path: megatron's norm read on the host, its clip, the guarded skip.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks


def _runtime():
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.runtime import init_parallel

    return init_parallel(ParallelConfig(), PrecisionConfig())


def _build(rt, world, lr, clip, sync_free):
    from r1mega.config import ModelConfig, OptimizerConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer, use_fused_adam
    from r1mega.train.step import TrainStep

    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=64)
    torch.manual_seed(1234)  # same initial weights for both paths
    chunks = build_model(cfg, rt, distributed_optimizer=world > 1)
    optim = build_optimizer(OptimizerConfig(lr=lr, clip_grad=clip, warmup_steps=2), chunks, rt,
                            distributed=world > 1, total_steps=10)
    use_fused_adam(optim.optimizer)  # both paths: the same update kernel
    step = TrainStep(chunks, optim, rt, micro_batch_tokens=32)
    step.sync_free = sync_free
    return cfg, rt, chunks, optim, step


def compare_run(rank, world, clip):
    """3 steps (clipping active when clip is small), a NaN-gradient step, 1 more step."""
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.train.step import sft_loss_fn, sft_sample

    out = {}
    rt = _runtime()
    for sync_free in (False, True):
        cfg, rt, chunks, optim, step = _build(rt, world, 1e-2, clip, sync_free)
        base = sft_loss_fn(cfg.vocab_size, rt.tp_group)

        def poisoned(logits, mb):
            logits.register_hook(lambda g: torch.full_like(g, float("nan")))
            return base(logits, mb)

        g = torch.Generator().manual_seed(7 + rank)
        samples = [sft_sample(torch.randint(1, 64, (n,), generator=g), 2) for n in (9, 14)]
        hist = []
        for fn in (base, base, base, poisoned, base):
            r = step(samples, fn)
            hist.append({"loss": r.loss, "norm": r.grad_norm, "ok": r.update_successful,
                         "tokens": r.num_tokens, "lr": r.lr,
                         "nll": r.metrics_sum.get("nll_sum")})
        step(samples, base).update_successful  # resolves the last pending result
        params = {k: p.detach().clone() for k, p in named_global_parameters(chunks)}
        out[sync_free] = {"hist": hist, "params": params,
                          "sched_steps": optim.scheduler.num_steps,
                          "supported": __import__("r1mega.train.device_step", fromlist=["x"])
                          .sync_free_supported(optim.optimizer)}
    return out


@pytest.mark.parametrize("world,clip", [(1, 1e-3), (1, 0.0), (2, 1e-3)])
def test_sync_free_step_matches_the_host_path(world, clip):
    r = run_ranks(compare_run, world, args=(clip,))[0]
    host, dev = r[False], r[True]
    assert dev["supported"]
    for h, d in zip(host["hist"], dev["hist"]):
        assert d["ok"] == h["ok"] and d["tokens"] == h["tokens"] and d["lr"] == h["lr"]
        assert d["loss"] == pytest.approx(h["loss"], rel=1e-5)
        assert d["nll"] == pytest.approx(h["nll"], rel=1e-5)
        if h["ok"]:
            assert d["norm"] == pytest.approx(h["norm"], rel=1e-4)
    assert [h["ok"] for h in dev["hist"]] == [True, True, True, False, True]
    # Six steps, one skipped: the skipped one advanced neither path's schedule.
    assert dev["sched_steps"] == host["sched_steps"] == 5
    for k, p in host["params"].items():
        torch.testing.assert_close(dev["params"][k], p, rtol=1e-4, atol=1e-6)
    # Clipping actually acted in the clipped case (a tiny max norm): the steps differ from clip=0.
    if clip:
        assert all(h["norm"] > clip for h in host["hist"] if h["ok"])


def nan_untouched_run(rank, world):
    """A NaN-gradient sync-free step leaves parameters and Adam state bit-identical."""
    from r1mega.parallel.sharding import named_global_parameters
    from r1mega.train.step import sft_loss_fn, sft_sample

    cfg, rt, chunks, optim, step = _build(_runtime(), world, 1e-2, 1.0, True)
    base = sft_loss_fn(cfg.vocab_size, rt.tp_group)

    def poisoned(logits, mb):
        logits.register_hook(lambda g: torch.full_like(g, float("inf")))
        return base(logits, mb)

    samples = [sft_sample(torch.arange(1, 9), 2), sft_sample(torch.arange(3, 15), 2)]
    step(samples, base).loss
    inner = optim.optimizer.chained_optimizers[0].optimizer if hasattr(
        optim.optimizer, "chained_optimizers") else optim.optimizer.optimizer
    params = {k: p.detach().clone() for k, p in named_global_parameters(chunks)}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in inner.state.items()}
    bad = step(samples, poisoned)
    same_params = all(torch.equal(params[k], p) for k, p in named_global_parameters(chunks))
    same_state = all(torch.equal(state[id(p)][k], v) for p, s in inner.state.items()
                     for k, v in s.items())
    return {"ok": bad.update_successful, "loss_finite": bool(torch.isfinite(torch.tensor(bad.loss))),
            "same_params": same_params, "same_state": same_state,
            "norm_finite": bool(torch.isfinite(torch.tensor(bad.grad_norm)))}


def test_sync_free_skip_leaves_weights_and_moments_untouched():
    r = run_ranks(nan_untouched_run, 1)[0]
    assert r["loss_finite"] and not r["norm_finite"] and not r["ok"]
    assert r["same_params"] and r["same_state"]
