"""grpo_loss (PyTorch path) against hand-computed values and a textbook re-implementation."""
import math
from dataclasses import replace

import pytest
import torch

from r1mega.config import GRPOConfig
from r1mega.ops.grpo_loss import finalize_metrics, grpo_loss, last_impl, local_normalizer
from r1mega.ops.logprobs import reference_logprobs
from r1mega.rl.advantages import group_advantages


def textbook_loss(logits, targets, adv, old, mask, cfg, *, vocab, temperature=1.0, ref=None, roll=None,
                  seq_ids=None, normalizer):
    """Written from the formulas, loops over sequences, full-vocab log_softmax: independent of r1mega."""
    logp, _ = reference_logprobs(logits, targets, vocab_size=vocab, temperature=temperature)
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high))
    if cfg.dual_clip:
        pg = torch.where(adv < 0, torch.minimum(pg, -cfg.dual_clip * adv), pg)
    if cfg.tis_cap:
        pg = pg * torch.clamp(torch.exp(old - roll), max=cfg.tis_cap)
    per_tok = pg
    if cfg.kl_beta:
        d = ref - logp
        kl = {"k1": -d, "k2": 0.5 * d ** 2, "k3": torch.exp(d) - d - 1}[cfg.kl_estimator]
        per_tok = per_tok + cfg.kl_beta * kl
    if cfg.loss_agg == "seq_mean_token_mean":
        total = 0.0
        for s in seq_ids.unique().tolist():
            sel = (seq_ids == s) & (mask > 0)
            if sel.any():
                total = total + per_tok[sel].sum() / sel.sum()
        return total / normalizer
    return per_tok[mask > 0].sum() / normalizer


def _batch(seed, n_tok=40, vocab=29, padded=32, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_tok, padded, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, vocab, (n_tok,), generator=g)
    with torch.no_grad():
        cur, _ = reference_logprobs(logits, targets, vocab_size=vocab)
    old = cur + 0.4 * torch.randn(n_tok, generator=g, dtype=dtype)
    adv = torch.randn(n_tok, generator=g, dtype=dtype)
    ref = cur + 0.3 * torch.randn(n_tok, generator=g, dtype=dtype)
    roll = old + 0.3 * torch.randn(n_tok, generator=g, dtype=dtype)
    mask = (torch.rand(n_tok, generator=g) > 0.25).to(dtype)
    seq_ids = torch.sort(torch.randint(0, 6, (n_tok,), generator=g)).values
    return logits, targets, old, adv, ref, roll, mask, seq_ids


def test_hand_computed_case():
    logits = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)  # p = [1/2, 1/2] each
    targets = torch.tensor([0, 1])
    ln_half = math.log(0.5)
    old = torch.tensor([ln_half - math.log(1.5), ln_half - math.log(0.5)], dtype=torch.float64)
    # ratios 1.5 (clipped at 1.28 for A=+1) and 0.5 (unclipped for A=+1); k1 KL with ref 0.2 below
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, kl_beta=0.1, kl_estimator="k1")
    loss, metrics = grpo_loss(logits, targets, torch.ones(2, dtype=torch.float64), old, torch.ones(2),
                              cfg=cfg, vocab_size=2, ref_logp=torch.full((2,), ln_half - 0.2, dtype=torch.float64),
                              normalizer=2.0)
    assert loss.item() == pytest.approx((-1.28 - 0.5) / 2 + 0.1 * 0.2, abs=1e-12)
    loss.backward()
    # dL/dlogp: token 0 only the KL term (0.1/2); token 1: -ratio/2 + 0.05 = -0.2; dlogp/dz = onehot - p
    assert torch.allclose(logits.grad, torch.tensor([[0.025, -0.025], [0.1, -0.1]], dtype=torch.float64))
    m = finalize_metrics(metrics)
    assert m["clip_frac_high"] == 0.5 and m["clip_frac_low"] == 0.0
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["ratio"] == pytest.approx(1.0) and m["ref_kl"] == pytest.approx(0.2)
    assert m["entropy"] == pytest.approx(math.log(2))
    assert last_impl() == "torch"


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("extras", [{}, {"dual_clip": 2.0, "tis_cap": 1.5}])
def test_matches_textbook(loss_agg, kl, extras):
    logits, targets, old, adv, ref, roll, mask, seq_ids = _batch(seed=hash((loss_agg, kl)) % 1000)
    cfg = GRPOConfig(eps_low=0.2, eps_high=0.28, kl_beta=0.07, kl_estimator=kl, loss_agg=loss_agg, **extras)
    norm = local_normalizer(mask, loss_agg=loss_agg, seq_ids=seq_ids, norm_tokens=50)
    kw = dict(vocab=29, temperature=0.8, ref=ref, roll=roll, seq_ids=seq_ids, normalizer=norm)
    x1 = logits.clone().requires_grad_(True)
    loss, _ = grpo_loss(x1, targets, adv, old, mask, cfg=cfg, tp_group=None, vocab_size=29, temperature=0.8,
                        ref_logp=ref, rollout_logp=roll, seq_ids=seq_ids, normalizer=norm, impl="torch")
    loss.backward()
    x2 = logits.clone().requires_grad_(True)
    want = textbook_loss(x2, targets, adv, old, mask, cfg, **kw)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-12)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)


def test_gradcheck_float64():
    logits, targets, old, adv, ref, roll, mask, seq_ids = _batch(seed=11, n_tok=6, vocab=7, padded=8)
    cfg = GRPOConfig(kl_beta=0.1, kl_estimator="k3", dual_clip=3.0, tis_cap=2.0, loss_agg="seq_mean_token_mean")

    def f(x):
        return grpo_loss(x, targets, adv, old, mask, cfg=cfg, vocab_size=7, temperature=1.3, ref_logp=ref,
                         rollout_logp=roll, seq_ids=seq_ids, normalizer=3.0, impl="torch")[0]

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_all_equal_groups_give_no_policy_gradient():
    adv_seq, equal = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3)
    assert equal.all()
    logits, targets, old, _, ref, roll, mask, _ = _batch(seed=3, n_tok=6)
    x = logits.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, targets, adv_seq.double(), old, mask, cfg=GRPOConfig(kl_beta=0.0), vocab_size=29,
                        normalizer=float(mask.sum()))
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_masked_tokens_contribute_nothing():
    logits, targets, old, adv, ref, roll, mask, seq_ids = _batch(seed=5)
    cfg = GRPOConfig(kl_beta=0.1, dual_clip=3.0, tis_cap=2.0, loss_agg="seq_mean_token_mean")
    norm = local_normalizer(mask, loss_agg=cfg.loss_agg, seq_ids=seq_ids)
    off = mask == 0
    # garbage where the mask is 0: ignore-index targets, non-finite log-probs and advantages
    t2, o2, a2, r2, ro2 = targets.clone(), old.clone(), adv.clone(), ref.clone(), roll.clone()
    t2[off], o2[off], a2[off], r2[off], ro2[off] = -100, float("nan"), float("inf"), float("-inf"), float("nan")
    x_all = logits.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x_all, t2, a2, o2, mask, cfg=cfg, vocab_size=29, ref_logp=r2, rollout_logp=ro2,
                              seq_ids=seq_ids, normalizer=norm)
    loss.backward()
    on = ~off
    x_on = logits[on].clone().requires_grad_(True)
    loss_on, _ = grpo_loss(x_on, targets[on], adv[on], old[on], mask[on], cfg=cfg, vocab_size=29,
                           ref_logp=ref[on], rollout_logp=roll[on], seq_ids=seq_ids[on], normalizer=norm)
    loss_on.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(loss_on.item(), abs=1e-12)
    assert (x_all.grad[off] == 0).all() and torch.allclose(x_all.grad[on], x_on.grad, atol=1e-12)
    assert all(torch.isfinite(v) for k, v in metrics.items() if not k.startswith("ratio_m"))
    assert float(metrics["n_tokens"]) == float(mask.sum())


def test_dual_clip_bounds_negative_advantage_loss():
    # ratio e^2 ~ 7.39 with A = -1: plain clipping gives loss 7.39, the dual clip caps it at c = 3
    logits = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([math.log(0.25) - 2.0], dtype=torch.float64)
    for c, want, grad_zero in ((0.0, math.exp(2.0), False), (3.0, 3.0, True)):
        logits.grad = None
        loss, m = grpo_loss(logits, torch.tensor([1]), torch.tensor([-1.0], dtype=torch.float64), old,
                            torch.ones(1), cfg=GRPOConfig(dual_clip=c), vocab_size=4, normalizer=1.0)
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=1e-12)
        assert bool((logits.grad == 0).all()) == grad_zero
        assert float(m["dual_clip_frac_sum"]) == (1.0 if c else 0.0)


def test_truncated_importance_weight_scales_policy_term():
    logits, targets, old, adv, _, roll, mask, _ = _batch(seed=8)
    norm = float(mask.sum())
    base, _ = grpo_loss(logits, targets, adv, old, mask, cfg=GRPOConfig(), vocab_size=29, normalizer=norm)
    w = torch.clamp(torch.exp(old - roll), max=1.2)
    # equal rollout and old log-probs give weight 1 exactly
    same, _ = grpo_loss(logits, targets, adv, old, mask, cfg=GRPOConfig(tis_cap=1.2), vocab_size=29,
                        rollout_logp=old, normalizer=norm)
    assert same.item() == pytest.approx(base.item(), abs=1e-12)
    tis, _ = grpo_loss(logits, targets, adv, old, mask, cfg=GRPOConfig(tis_cap=1.2), vocab_size=29,
                       rollout_logp=roll, normalizer=norm)
    cur, _ = reference_logprobs(logits, targets, vocab_size=29)
    r = torch.exp(cur - old)
    pg = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    assert tis.item() == pytest.approx(float((pg * w * mask).sum() / norm), abs=1e-12)


def test_micro_batches_sum_to_the_full_batch():
    logits, targets, old, adv, ref, roll, mask, seq_ids = _batch(seed=9, n_tok=48)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        cfg = GRPOConfig(kl_beta=0.05, loss_agg=agg)
        parts = [slice(0, 24), slice(24, 48)]
        # split on a sequence boundary, as packing does
        cut = int((seq_ids < seq_ids[24]).sum())
        parts = [slice(0, cut), slice(cut, 48)]
        norm = sum(local_normalizer(mask[p], loss_agg=agg, seq_ids=seq_ids[p], norm_tokens=30) for p in parts)
        full, _ = grpo_loss(logits, targets, adv, old, mask, cfg=cfg, vocab_size=29, ref_logp=ref,
                            seq_ids=seq_ids, normalizer=norm)
        split = sum(grpo_loss(logits[p], targets[p], adv[p], old[p], mask[p], cfg=cfg, vocab_size=29,
                              ref_logp=ref[p], seq_ids=seq_ids[p], normalizer=norm)[0] for p in parts)
        assert split.item() == pytest.approx(full.item(), abs=1e-12), agg


def test_kl_estimator_values():
    logits = torch.zeros(1, 2, dtype=torch.float64)  # logp = ln 1/2
    ln_half = math.log(0.5)
    for est, want in (("k1", -0.3), ("k2", 0.5 * 0.09), ("k3", math.exp(0.3) - 0.3 - 1)):
        cfg = GRPOConfig(kl_beta=1.0, kl_estimator=est)
        loss, m = grpo_loss(logits, torch.tensor([0]), torch.zeros(1, dtype=torch.float64),
                            torch.tensor([ln_half], dtype=torch.float64), torch.ones(1), cfg=cfg, vocab_size=2,
                            ref_logp=torch.tensor([ln_half + 0.3], dtype=torch.float64), normalizer=1.0)
        assert loss.item() == pytest.approx(want, abs=1e-12)
        assert float(m["ref_kl_sum"]) == pytest.approx(want, abs=1e-6)


def test_bad_config_is_named():
    x, t = torch.zeros(2, 3), torch.tensor([0, 1])
    z, one = torch.zeros(2), torch.ones(2)
    cases = [(GRPOConfig(kl_beta=0.1), {}, "ref_logp"), (GRPOConfig(tis_cap=2.0), {}, "rollout_logp"),
             (GRPOConfig(loss_agg="sum"), {}, "grpo.loss_agg"), (GRPOConfig(dual_clip=0.5), {}, "dual_clip"),
             (GRPOConfig(loss_agg="seq_mean_token_mean"), {}, "seq_ids"),
             (GRPOConfig(), {"normalizer": 0.0}, "normalizer")]
    for cfg, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            grpo_loss(x, t, z, z, one, cfg=cfg, vocab_size=3, **{"normalizer": 2.0, **kw})
    with pytest.raises(ValueError, match="old_logp must have shape"):
        grpo_loss(x, t, z, torch.zeros(3), one, cfg=replace(GRPOConfig()), vocab_size=3, normalizer=2.0)
