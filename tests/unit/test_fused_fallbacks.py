"""The torch._foreach replacements of megatron's local multi-tensor fallbacks: same values, no
per-parameter host round trip, installed only over megatron's own fallbacks."""
import torch

from r1mega.parallel import fused_fallbacks as ff


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in [(7, 3), (128,), (5, 4, 3), (1,)]]


def test_l2_norm_matches_reference():
    ts = _tensors()
    ref = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    total, per = ff.foreach_l2_norm(2048, torch.zeros(1, dtype=torch.int), [ts], False)
    assert per is None and total.shape == (1,) and total.dtype == torch.float32
    assert abs(float(total) - float(ref)) <= 1e-5 * float(ref)
    # and against megatron's own fallback
    from megatron.core.utils import local_multi_tensor_l2_norm
    import megatron.core.utils as mu
    orig = torch.tensor
    try:  # megatron's fallback hard-codes device="cuda" for its result
        mu.torch.tensor = lambda *a, **k: orig(*a, **{**k, "device": "cpu"}) if k.get("device") == "cuda" else orig(*a, **k)
        theirs, _ = local_multi_tensor_l2_norm(2048, None, [ts], False)
    finally:
        mu.torch.tensor = orig
    assert abs(float(total) - float(theirs)) <= 1e-5 * float(ref)


def test_l2_norm_of_nothing_is_zero():
    total, _ = ff.foreach_l2_norm(2048, torch.zeros(1, dtype=torch.int), [[]], False)
    assert float(total) == 0.0


def test_scale_in_place_and_copy():
    ts = _tensors(1)
    want = [t * 0.37 for t in ts]
    ff.foreach_scale(2048, None, [ts, ts], 0.37)
    for a, b in zip(ts, want):
        assert torch.equal(a, b)
    src, dst = _tensors(2), [torch.empty(t.shape) for t in _tensors(2)]
    ff.foreach_scale(2048, None, [src, dst], 2.0)
    for s, d in zip(src, dst):
        assert torch.equal(d, s * 2.0)


def test_install_replaces_only_megatron_fallbacks():
    from megatron.core import utils as mu
    from megatron.core.optimizer import clip_grads

    ff.install()
    assert clip_grads.l2_norm_impl is not mu.local_multi_tensor_l2_norm
    assert clip_grads.multi_tensor_scale_impl is not mu.local_multi_tensor_scale
    assert ff.install() == []  # idempotent: nothing of megatron's left to replace


def test_host_label_check_names_the_problem():
    import pytest

    from r1mega.train.step import check_label_ids, sft_sample

    ok = sft_sample(torch.tensor([1, 2, 3, 4]), prompt_tokens=1)
    check_label_ids([ok], vocab_size=5)
    bad = sft_sample(torch.tensor([1, 2, 9, 4]), prompt_tokens=1)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        check_label_ids([ok, bad], vocab_size=5)
