"""Tensor parallelism over the vocabulary: TP=2 (two gloo ranks) equals TP=1, values and gradients,
for the logits entry points and for the LM-head-fused one (grpo_loss_from_hidden).

Self-contained: a tiny spawn helper below starts the ranks (no shared harness).
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TP = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(fn, world_size, *args):
    """Spawn `world_size` gloo ranks running fn(rank, world_size, *args); a failing rank fails the test."""
    port = _free_port()
    mp.spawn(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _case(seed, n_tok, local_cols, vocab):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tok, TP * local_cols, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (n_tok,), generator=g)
    old = -torch.rand(n_tok, generator=g, dtype=torch.float64) * 4 - 1
    adv = torch.randn(n_tok, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(n_tok, generator=g, dtype=torch.float64)
    mask = (torch.rand(n_tok, generator=g) > 0.2).double()
    seq_ids = torch.sort(torch.randint(0, 4, (n_tok,), generator=g)).values
    return logits, targets, old, adv, ref, mask, seq_ids


def _check_rank(rank, world_size):
    from r1mega.config import GRPOConfig
    from r1mega.ops.grpo_loss import grpo_loss, last_impl
    from r1mega.ops.logprobs import reference_logprobs, vocab_parallel_logprobs

    group = dist.group.WORLD
    # (local columns, vocab): padding inside rank 1's shard; and rank 1's shard ALL padding
    for seed, (local_cols, vocab) in enumerate([(24, 45), (16, 13)]):
        logits, targets, old, adv, ref, mask, seq_ids = _case(seed, 19, local_cols, vocab)
        cfg = GRPOConfig(kl_beta=0.05, kl_estimator="k3", dual_clip=3.0, loss_agg="seq_mean_token_mean")
        kw = dict(cfg=cfg, vocab_size=vocab, temperature=0.9, ref_logp=ref, seq_ids=seq_ids, normalizer=3.0)
        cols = slice(rank * local_cols, (rank + 1) * local_cols)

        # log-probs and entropy, with a gradient through both
        shard = logits[:, cols].clone().requires_grad_(True)
        logp, ent = vocab_parallel_logprobs(shard, targets, tp_group=group, vocab_size=vocab,
                                            temperature=0.9, with_entropy=True)
        (logp * adv + 0.3 * ent).sum().backward()
        full = logits.clone().requires_grad_(True)
        ref_lp, ref_ent = reference_logprobs(full, targets, vocab_size=vocab, temperature=0.9)
        (ref_lp * adv + 0.3 * ref_ent).sum().backward()
        assert torch.allclose(logp, ref_lp, atol=1e-12) and torch.allclose(ent, ref_ent, atol=1e-12)
        assert torch.allclose(shard.grad, full.grad[:, cols], atol=1e-12)

        # the GRPO loss: TP=2 shard on this rank vs TP=1 on the full logits
        shard = logits[:, cols].clone().requires_grad_(True)
        loss_tp, metrics_tp = grpo_loss(shard, targets, adv, old, mask, tp_group=group, **kw)
        loss_tp.backward()
        assert last_impl() == "torch"
        full = logits.clone().requires_grad_(True)
        loss_1, metrics_1 = grpo_loss(full, targets, adv, old, mask, tp_group=None, **kw)
        loss_1.backward()
        assert abs(loss_tp.item() - loss_1.item()) < 1e-12, (rank, loss_tp.item(), loss_1.item())
        gathered = [torch.empty_like(shard.grad) for _ in range(world_size)]
        dist.all_gather(gathered, shard.grad.contiguous(), group=group)
        assert torch.allclose(torch.cat(gathered, dim=1), full.grad, atol=1e-12)
        for key in metrics_1:
            assert torch.allclose(metrics_tp[key].double(), metrics_1[key].double(), atol=1e-6), key

    # LM head fused with the loss: hidden states on every rank, this rank's rows of the weight
    from r1mega.ops.grpo_loss import grpo_loss_from_hidden
    local_rows, vocab, hid = 24, 45, 10
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(19, hid, generator=g, dtype=torch.float64)
    weight = torch.randn(TP * local_rows, hid, generator=g, dtype=torch.float64) * 0.5
    _, targets, old, adv, ref, mask, seq_ids = _case(7, 19, local_rows, vocab)
    cfg = GRPOConfig(kl_beta=0.05, loss_agg="token_mean")
    kw = dict(cfg=cfg, vocab_size=vocab, ref_logp=ref, normalizer=float(mask.sum()))
    rows = slice(rank * local_rows, (rank + 1) * local_rows)
    h_tp, w_tp = hidden.clone().requires_grad_(True), weight[rows].clone().requires_grad_(True)
    loss_tp, _ = grpo_loss_from_hidden(h_tp, w_tp, targets, adv, old, mask, tp_group=group, chunk_tokens=6, **kw)
    loss_tp.backward()
    h_1, w_1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss_1, _ = grpo_loss_from_hidden(h_1, w_1, targets, adv, old, mask, tp_group=None, **kw)
    loss_1.backward()
    assert abs(loss_tp.item() - loss_1.item()) < 1e-12
    assert torch.allclose(h_tp.grad, h_1.grad, atol=1e-12)  # d hidden all-reduced over the TP group
    assert torch.allclose(w_tp.grad, w_1.grad[rows], atol=1e-12)


def test_tp2_equals_tp1():
    _run_ranks(_check_rank, TP)
