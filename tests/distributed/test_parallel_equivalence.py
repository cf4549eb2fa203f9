"""TP / PP / DP / TP×PP / interleaved-PP training equals the single-rank run (CPU, gloo, fp32).

The reference is the same megatron model on one rank. Every layout starts from the reference's
initial weights (sharded by megatron's partition markers), trains on the same global batch of
packed sequences of different lengths (DP ranks split it; every layout packs differently), and
must give the same loss, the same full gradients of step 1 (gathered and un-sharded) and the same
parameters after 3 Adam steps with clipping, warmup and cosine decay.

With ``R1MEGA_TEST_BACKEND=nccl`` the same runs go on GPUs (NCCL, bf16), one per rank, and are
compared with the bf16 tolerances of tests/distributed/harness.py (BF16_REL, justified there).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import assert_rel_close, assert_update_close, on_gpus, run_ranks

LAYOUTS = {
    "single": dict(tensor=1, pipeline=1, virtual_stages=1, world=1),
    "tp2": dict(tensor=2, pipeline=1, virtual_stages=1, world=2),
    "tp2_sequence_parallel": dict(tensor=2, pipeline=1, virtual_stages=1, world=2, sp=True),
    "pp2": dict(tensor=1, pipeline=2, virtual_stages=1, world=2),
    # DP with the gradient reduce-scatter overlapped with backward (bucketed, async)
    "dp2": dict(tensor=1, pipeline=1, virtual_stages=1, world=2, overlap=True),
    "tp2pp2": dict(tensor=2, pipeline=2, virtual_stages=1, world=4),
    "pp2_interleaved": dict(tensor=1, pipeline=2, virtual_stages=2, world=2),
}
STEPS = 3
MICRO_BATCH_TOKENS = 16


def _model_cfg():
    from r1mega.config import ModelConfig

    # qk_norm + qkv_bias + tied embeddings + padded vocabulary: every TP/PP special case at once.
    return ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=96, vocab_size=100, qk_norm=True, qkv_bias=True,
                       tied_embeddings=True)


def _samples():
    from r1mega.train.step import sft_sample

    g = torch.Generator().manual_seed(7)
    lengths = [5, 9, 3, 12, 7, 4, 10, 6]
    return [sft_sample(torch.randint(0, 100, (n,), generator=g), prompt_tokens=2) for n in lengths]


def _gather_dp_sharded_grads(chunks, rt):
    """Distributed optimizer: after the reduce-scatter each DP rank holds a valid shard of every
    grad bucket; all-gather them so main_grad is the full reduced gradient again."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    if rt.dp_size == 1:
        return
    for chunk in chunks:
        for buf in chunk.buffers:
            for bucket in buf.buckets:
                shards = shard_buffer(bucket.grad_data, rt.dp_size)
                mine = shards[rt.dp_rank].clone()
                dist.all_gather(list(shards), mine, group=rt.dp_group)


def run_layout(rank, world, layout, init_state):
    from r1mega.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import init_parallel
    from r1mega.parallel.sharding import gather_full, load_full_state, named_global_parameters
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import (TrainStep, forward_only, sft_loss_fn, sft_sample,
                                   vocab_parallel_target_logprobs)

    model_cfg = _model_cfg()
    par = ParallelConfig(tensor=layout["tensor"], pipeline=layout["pipeline"],
                         virtual_stages=layout["virtual_stages"],
                         sequence_parallel=layout.get("sp", False))
    rt = init_parallel(par, PrecisionConfig())
    chunks = build_model(model_cfg, rt, wrap=True, distributed_optimizer=True,
                         overlap_grad_reduce=layout.get("overlap", False))
    named = dict(named_global_parameters(chunks))
    if init_state is None:
        with torch.no_grad():  # non-trivial norm weights so that their gradients matter
            for name, p in named.items():
                if "layernorm" in name:
                    p.uniform_(0.5, 1.5)
        init_state = gather_full({k: p.data for k, p in named.items()}, named, rt.tp_rank, rt.tp_size)
    else:
        load_full_state(chunks, init_state, rt.tp_rank, rt.tp_size, model_cfg.tied_embeddings)
    # Old/reference log-probs path: forward-only through the schedule, on every rank (rank 0 is
    # the FIRST pipeline stage, so under PP this checks the broadcast too).
    logp_fn = lambda logits, mb: vocab_parallel_target_logprobs(  # noqa: E731
        logits, mb.fields["labels"], vocab_size=model_cfg.vocab_size, tp_group=rt.tp_group)
    init_logprobs = forward_only(chunks, rt, _samples(), logp_fn, MICRO_BATCH_TOKENS)
    # Equal-length sequences run as (B, S) batches, (S, B, H) activations between stages.
    g = torch.Generator().manual_seed(3)
    equal = [sft_sample(torch.randint(0, 100, (8,), generator=g)) for _ in range(4)]
    equal_logprobs = forward_only(chunks, rt, equal, logp_fn, MICRO_BATCH_TOKENS)
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_style="cosine",
                          decay_steps=STEPS, clip_grad=1.0, weight_decay=0.01)
    step = TrainStep(chunks, build_optimizer(opt, chunks, rt, distributed=True, total_steps=STEPS),
                     rt, micro_batch_tokens=MICRO_BATCH_TOKENS)
    loss_fn = sft_loss_fn(model_cfg.vocab_size, rt.tp_group)
    samples = _samples()[rt.dp_rank::rt.dp_size]

    # Step 1 by hand to read the gradients between backward and update.
    mbs = step.micro_batches(samples)
    sums = step.forward_backward(mbs, loss_fn)
    _gather_dp_sharded_grads(chunks, rt)
    keep = {k: p for k, p in named.items() if not (k == "output_layer.weight" and model_cfg.tied_embeddings)}
    grads = gather_full({k: p.main_grad for k, p in keep.items()}, keep, rt.tp_rank, rt.tp_size)
    results = [step.optimizer_step(sums, len(mbs))]
    for _ in range(STEPS - 1):
        results.append(step(samples, loss_fn))
    params = gather_full({k: p.data for k, p in keep.items()}, keep, rt.tp_rank, rt.tp_size)
    if rank != 0:
        return None
    return {"losses": [r.loss for r in results], "tokens": [r.num_tokens for r in results],
            "grad_norms": [r.grad_norm for r in results], "lrs": [r.lr for r in results],
            "num_micro_batches": len(mbs), "init_logprobs": init_logprobs,
            "equal_logprobs": equal_logprobs, "grads": grads, "params": params, "init": init_state}


@pytest.fixture(scope="module")
def reference():
    return run_ranks(run_layout, 1, args=(LAYOUTS["single"], None))[0]


def test_reference_trains(reference):
    # every parameter takes part (a zero gradient would make the layout comparison vacuous)
    for k, g in reference["grads"].items():
        assert g.abs().sum() > 0, k
    # forward_only log-probs agree with the training loss of step 1 (same weights, same tokens)
    samples = _samples()
    nll = -sum((lp.cpu() * s["loss_mask"]).sum() for lp, s in zip(reference["init_logprobs"], samples))
    rel = 2e-2 if on_gpus() else 1e-5  # bf16 on GPUs: see BF16_REL["loss"] in the harness
    assert float(nll) / reference["tokens"][0] == pytest.approx(reference["losses"][0], rel=rel)
    losses = reference["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert reference["tokens"] == [sum(n - 2 for n in [5, 9, 3, 12, 7, 4, 10, 6])] * STEPS
    # warmup 1 step to 1e-3, then cosine to 1e-4 at step 3
    assert reference["lrs"][0] == pytest.approx(1e-3)
    assert reference["lrs"][-1] == pytest.approx(1e-4)
    # The bf16 comparison (GPUs) passes the reference against itself and catches a wrong gradient.
    _compare_bf16(reference, reference, "self")
    wrong = dict(reference, grads=dict(reference["grads"]))
    k = next(iter(wrong["grads"]))
    wrong["grads"][k] = wrong["grads"][k] * 1.2
    with pytest.raises(AssertionError, match=f"grad {k}"):
        _compare_bf16(wrong, reference, "wrong grad")
    k = next(k for k in reference["params"] if "linear_fc1" in k)
    missed = dict(reference, params=dict(reference["params"], **{k: reference["init"][k]}))
    with pytest.raises(AssertionError, match=f"param {k} .*update"):
        _compare_bf16(missed, reference, "missed update")


@pytest.mark.parametrize("name", [k for k in LAYOUTS if k != "single"])
def test_layout_matches_single_rank(reference, name):
    layout = LAYOUTS[name]
    got = run_ranks(run_layout, layout["world"], args=(layout, reference["init"]))[0]
    if on_gpus():
        _compare_bf16(got, reference, name)
        return
    assert got["losses"] == pytest.approx(reference["losses"], rel=1e-5, abs=1e-6)
    assert got["tokens"] == reference["tokens"]
    assert got["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-4)
    for key in ("init_logprobs", "equal_logprobs"):
        for a, b in zip(got[key], reference[key]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{key} ({name})")
    assert set(got["grads"]) == set(reference["grads"])
    for k, g in reference["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, atol=1e-6, rtol=1e-4, msg=f"grad {k} ({name})")
    for k, p in reference["params"].items():
        torch.testing.assert_close(got["params"][k], p, atol=1e-5, rtol=1e-4, msg=f"param {k} ({name})")
    _compare_bf16(got, reference, name)  # fp32 agreement implies it: checks the GPU path's code


def _compare_bf16(got, ref, name):
    """The same checks as the fp32 path, with the whole-tensor bf16 tolerances (harness.BF16_REL)."""
    assert got["tokens"] == ref["tokens"]
    assert_rel_close(got["losses"], ref["losses"], "loss", f"losses ({name})")
    assert_rel_close(got["grad_norms"], ref["grad_norms"], "grad_norm", f"grad norms ({name})")
    for key in ("init_logprobs", "equal_logprobs"):
        for i, (a, b) in enumerate(zip(got[key], ref[key])):
            assert_rel_close(a.float(), b.float(), "logprobs", f"{key}[{i}] ({name})")
    assert set(got["grads"]) == set(ref["grads"])
    for k, g in ref["grads"].items():
        assert_rel_close(got["grads"][k].float(), g.float(), "grad", f"grad {k} ({name})")
    for k, p in ref["params"].items():
        assert_update_close(got["params"][k], p, ref["init"][k], sum(ref["lrs"]), f"param {k} ({name})")


def uneven_batches(rank, world):
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.runtime import init_parallel
    from r1mega.train.batching import make_micro_batches
    from r1mega.train.step import sft_sample

    rt = init_parallel(ParallelConfig(), PrecisionConfig())
    lengths = [6] if rank == 0 else [6, 7, 8, 9, 10]
    samples = [sft_sample(torch.arange(n)) for n in lengths]
    mbs = make_micro_batches(samples, 10, dp_group=rt.dp_group, device=rt.device)
    # a rank with no samples at all still gets the fields (zeros) the loss function reads
    empty = make_micro_batches([] if rank == 0 else samples, 10, dp_group=rt.dp_group,
                               device=rt.device)
    return ([(mb.seq_lengths, mb.sample_index, float(mb.fields["loss_mask"].sum())) for mb in mbs],
            [(len(empty), sorted(mb.fields), str(mb.fields["labels"].dtype)) for mb in empty[:1]])


def test_dp_ranks_run_the_same_number_of_micro_batches():
    (r0, e0), (r1, e1) = run_ranks(uneven_batches, 2)
    assert e0 == e1 == [(5, ["labels", "loss_mask"], "torch.int64")]
    assert len(r0) == len(r1) == 5  # rank 1 needs 5 bins of <= 10 tokens; rank 0 pads to 5
    assert r0[0] == ((6,), (0,), 5.0)
    assert all(idx == (-1,) and mask == 0.0 for _, idx, mask in r0[1:])  # empty = one pad sequence
    assert sorted(i for _, idx, _ in r1 for i in idx) == [0, 1, 2, 3, 4]
