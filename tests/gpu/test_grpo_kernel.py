"""CUDA GRPO kernels vs the float64 PyTorch reference, on fresh random inputs with poisoned outputs.

Shapes are chosen so that token counts and vocabularies are not multiples of any block, with padded
vocabulary columns, masked tokens, temperature != 1, and both the fused (cluster) kernel and the
two-pass kernels (unaligned rows, simulated tensor parallelism) exercised.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from r1mega.config import GRPOConfig  # noqa: E402
from r1mega.ops import _cuda_ext  # noqa: E402
from r1mega.ops.grpo_loss import grpo_loss, last_impl, last_kernel  # noqa: E402
from r1mega.ops.logprobs import combine_stats, reference_logprobs  # noqa: E402

LOGP_TOL = 1e-3
GRAD_REL_TOL = 1e-2


@pytest.fixture(scope="module")
def ext():
    module = _cuda_ext.get()
    assert module is not None, f"r1mega_grpo_cuda did not load: {_cuda_ext.load_error()}"
    return module


def _poison_allocator(nbytes=1 << 30):
    """Fill cached, free device memory with NaN so a kernel that skips an output element shows."""
    junk = [torch.full((nbytes // 4,), float("nan"), device="cuda")]
    junk += [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(64)]  # small-block pool
    del junk


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(n_tok, cols, vocab, dtype, seed, masked_frac=0.3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n_tok, cols, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab, (n_tok,), device="cuda", generator=g)
    mask = (torch.rand(n_tok, device="cuda", generator=g) > masked_frac).float()
    targets[mask == 0] = -100  # ignore-index on masked tokens must be tolerated
    return logits, targets, mask, g


@pytest.mark.parametrize("fused", ["1", "0"], ids=["fused", "two_pass"])
@pytest.mark.parametrize("n_tok,cols,vocab,dtype", [
    (333, 32064, 32003, torch.bfloat16),     # aligned rows, padded vocab -> fused, cluster of 1
    (67, 152064, 152000, torch.bfloat16),    # the big vocab -> fused, cluster of 5
    (129, 50304, 50257, torch.float32),      # fp32 logits
    (101, 1003, 1000, torch.bfloat16),       # rows not 16-byte aligned -> two-pass scalar kernels
])
def test_grpo_loss_cuda_matches_reference(ext, monkeypatch, fused, n_tok, cols, vocab, dtype):
    monkeypatch.setenv("R1MEGA_GRPO_FUSED", fused)
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, dual_clip=3.0, kl_beta=0.05, kl_estimator="k3", tis_cap=2.0)
    logits, targets, mask, g = _inputs(n_tok, cols, vocab, dtype, seed=n_tok)
    ref_lp, _ = reference_logprobs(logits.double(), torch.where(mask > 0, targets, 0), vocab_size=vocab,
                                   temperature=0.9)
    old = (ref_lp + 0.3 * torch.randn(n_tok, device="cuda", generator=g, dtype=torch.float64)).float()
    adv = torch.randn(n_tok, device="cuda", generator=g)
    ref = old + 0.2 * torch.randn(n_tok, device="cuda", generator=g)
    roll = old + 0.2 * torch.randn(n_tok, device="cuda", generator=g)
    kw = dict(cfg=cfg, vocab_size=vocab, temperature=0.9, ref_logp=ref, rollout_logp=roll,
              normalizer=float(mask.sum()))

    x64 = logits.double().requires_grad_(True)
    loss64, m64 = grpo_loss(x64, targets, adv, old, mask, impl="torch", **kw)
    loss64.backward()

    for inplace in (False, True):
        _poison_allocator()
        x = logits.clone().requires_grad_(True)
        leaf = x if not inplace else None
        src = x if not inplace else x.clone()  # in-place destroys the input: give it a private copy
        loss, metrics = grpo_loss(src, targets, adv, old, mask, impl="cuda", inplace_backward=inplace, **kw)
        assert last_impl() == "cuda"
        assert last_kernel() == ("fused" if cols % 8 == 0 and fused == "1" else "two_pass")
        (loss * 2.5).backward()  # grad_output != 1 must rescale the stored gradient
        grad = (leaf.grad if leaf is not None else x.grad) / 2.5
        assert torch.isfinite(grad).all()
        assert abs(float(loss.detach()) - float(loss64)) <= 1e-3 * max(1.0, abs(float(loss64)))
        assert _rel(grad, x64.grad) <= GRAD_REL_TOL, (inplace, _rel(grad, x64.grad))
        assert (grad[mask == 0] == 0).all()
        assert float(grad[:, vocab:].abs().max()) == 0.0 if cols > vocab else True
        _assert_metrics_close(metrics, m64)


def _assert_metrics_close(metrics, m64):
    """Every metric of the CUDA path against the float64 reference (flags may flip for a ratio
    within float32 rounding of a clip bound: one token of slack)."""
    n = float(m64["n_tokens"])
    assert set(metrics) >= set(m64)
    assert float(metrics["n_tokens"]) == n
    for key in ("clip_frac_low_sum", "clip_frac_high_sum", "dual_clip_frac_sum"):
        assert abs(float(metrics[key]) - float(m64[key])) <= 1.0, key
    for key in ("entropy_sum", "approx_kl_sum", "ref_kl_sum", "ratio_sum"):
        assert abs(float(metrics[key]) - float(m64[key])) <= 1e-3 * max(n, abs(float(m64[key]))), key
    for key in ("ratio_min", "ratio_max"):
        assert abs(float(metrics[key]) - float(m64[key])) <= 1e-3 * abs(float(m64[key])), key
    assert float(metrics.get("bad_targets_sum", 0.0)) == 0.0


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_fused_loss_aggregations_match_reference(ext, loss_agg):
    n_tok, cols, vocab = 300, 32000, 31990
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, loss_agg=loss_agg, kl_beta=0.1, kl_estimator="k2")
    logits, targets, mask, g = _inputs(n_tok, cols, vocab, torch.bfloat16, seed=3)
    seq_ids = torch.arange(n_tok, device="cuda") // 37
    old = -torch.rand(n_tok, device="cuda", generator=g) * 12
    ref = old + 0.1 * torch.randn(n_tok, device="cuda", generator=g)
    adv = torch.randn(n_tok, device="cuda", generator=g)
    norm = float(mask.sum()) if loss_agg == "token_mean" else 9.0 * (128 if loss_agg.endswith("norm") else 1)
    kw = dict(cfg=cfg, vocab_size=vocab, ref_logp=ref, seq_ids=seq_ids, normalizer=norm)
    x64 = logits.double().requires_grad_(True)
    loss64, m64 = grpo_loss(x64, targets, adv, old, mask, impl="torch", **kw)
    loss64.backward()
    x = logits.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, targets, adv, old, mask, impl="cuda", **kw)
    assert last_kernel() == "fused"
    loss.backward()
    assert abs(float(loss) - float(loss64)) <= 1e-3 * max(1.0, abs(float(loss64)))
    assert _rel(x.grad, x64.grad) <= GRAD_REL_TOL
    _assert_metrics_close(metrics, m64)


@pytest.mark.parametrize("cols,vocab,dtype", [(4099, 4099, torch.bfloat16), (8200, 8195, torch.float16),
                                               (76032, 76000, torch.bfloat16)])
def test_shard_kernels_simulated_tp2(ext, cols, vocab, dtype):
    """Two vocabulary shards through shard_stats + combine + shard_backward == full-vocab reference."""
    n_tok = 77
    logits, targets, mask, g = _inputs(n_tok, 2 * cols, vocab, dtype, seed=cols)
    targets = torch.where(mask > 0, targets, 0)
    temp = 1.3
    x64 = logits.double().requires_grad_(True)
    ref_lp, ref_h = reference_logprobs(x64, targets, vocab_size=vocab, temperature=temp)
    g_lp = torch.randn(n_tok, device="cuda", generator=g, dtype=torch.float64)
    g_h = torch.randn(n_tok, device="cuda", generator=g, dtype=torch.float64)
    (ref_lp * g_lp + ref_h * g_h).sum().backward()

    shards = [logits[:, :cols], logits[:, cols:]]  # views: row stride 2*cols exercises strided rows
    _poison_allocator()
    stats = [ext.shard_stats(s, targets, r * cols, max(0, min(cols, vocab - r * cols)), 1 / temp)
             for r, s in enumerate(shards)]
    logp, ent, lse, mean_x = combine_stats(torch.stack(stats))
    assert float((logp.double() - ref_lp.detach()).abs().max()) <= LOGP_TOL
    assert float((ent.double() - ref_h.detach()).abs().max()) <= LOGP_TOL
    grads = []
    for r, s in enumerate(shards):
        out = torch.full_like(s, float("nan"))
        ext.shard_backward(s, out, targets, lse, mean_x, g_lp.float(), g_h.float(), r * cols,
                           max(0, min(cols, vocab - r * cols)), 1 / temp)
        grads.append(out)
    grad = torch.cat(grads, dim=1)
    assert torch.isfinite(grad).all()
    assert _rel(grad, x64.grad) <= GRAD_REL_TOL


@pytest.mark.parametrize("variant", ["", "1", "2", "3", "4"])
@pytest.mark.parametrize("n_tok", [45, 1000])
def test_fused_outputs_fully_written(ext, monkeypatch, n_tok, variant):
    """Every element of the gradient buffer and of logp/entropy is written (NaN-filled beforehand),
    for every fused-kernel shape (R1MEGA_GRPO_FUSED_VARIANT, incl. non-portable clusters > 8)."""
    monkeypatch.setenv("R1MEGA_GRPO_FUSED_VARIANT", variant)
    cols, vocab = 152064, 151900
    logits, targets, mask, g = _inputs(n_tok, cols, vocab, torch.bfloat16, seed=7, masked_frac=0.5)
    targets = torch.where(mask > 0, targets, 0)
    assert ext.fused_supported(logits), ext.fused_plan(logits)
    plan = list(ext.fused_plan(logits))
    if variant == "":
        assert plan[:3] == [5, 8, n_tok]  # 152,064 bf16 columns: clusters of 5 CTAs of 512 threads
    assert plan[0] * plan[1] * plan[3] * 8 >= cols and plan[2] == n_tok
    grad = torch.full_like(logits, float("nan"))
    zeros = torch.zeros(n_tok, device="cuda")
    _poison_allocator()
    logp, ent, stats = ext.fused_grpo(logits, grad, targets, torch.randn(n_tok, device="cuda", generator=g), zeros,
                               None, None, mask / mask.sum(), vocab, 1.0, 0.8, 1.28, 0.0, 0.0, 3, 0.0)
    assert torch.isfinite(grad).all() and torch.isfinite(logp).all() and torch.isfinite(ent).all()
    on_rows = (mask > 0)
    assert torch.isfinite(stats[on_rows]).all() and not stats.isnan().any()
    assert (stats[~on_rows][:, 9] == float("inf")).all() and (stats[~on_rows][:, 10] == -float("inf")).all()
    assert (stats[:, 1] == on_rows.float()).all()
    ref_lp, ref_h = reference_logprobs(logits.double(), targets, vocab_size=vocab)
    on = mask > 0
    assert float((logp.double() - ref_lp)[on].abs().max()) <= LOGP_TOL
    assert float((ent.double() - ref_h)[on].abs().max()) <= LOGP_TOL


def test_fused_bad_target_poisons_row_and_metrics_raise(ext):
    """An out-of-range id (not checked on the host, to avoid a sync) makes that row's gradient NaN,
    so the trainer's non-finite guard skips the update, and finalize_metrics names the cause."""
    from r1mega.ops.grpo_loss import finalize_metrics

    n_tok, vocab = 64, 32000
    logits = torch.randn(n_tok, vocab, device="cuda").to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, vocab, (n_tok,), device="cuda")
    targets[5] = vocab + 7
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28)
    loss, metrics = grpo_loss(logits, targets, torch.randn(n_tok, device="cuda"), torch.zeros(n_tok, device="cuda"),
                              torch.ones(n_tok, device="cuda"), cfg=cfg, vocab_size=vocab,
                              normalizer=float(n_tok), impl="cuda")
    assert last_kernel() == "fused"
    loss.backward()
    assert not torch.isfinite(logits.grad[5]).any()
    assert torch.isfinite(logits.grad[6]).all()
    with pytest.raises(ValueError, match="outside"):
        finalize_metrics(metrics)
