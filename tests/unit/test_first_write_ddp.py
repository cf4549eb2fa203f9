"""FirstWriteDDP (r1mega/models/ddp.py) against megatron's DistributedDataParallel, the
independent reference: same gradient buffers, bit for bit, over steps with one and several
micro-batches, a parameter left out of a step's forward (its gradient must read zero, not the
last step's), one marked zero_out_wgrad, and a step that fails midway; and no pass over the buffer before the forward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


def _module():
    torch.manual_seed(0)
    return nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16), "c": nn.Linear(16, 4)})


def _forward(m, x, use_b: bool):
    h = torch.tanh(m.a(x))
    if use_b:
        h = h + m.b(h)
    return m.c(h).square().mean()


def _wrap(cls, module, rt, fp32_grads: bool):
    from megatron.core.transformer import TransformerConfig

    from r1mega.config import PrecisionConfig
    from r1mega.models.gpt import make_ddp_config

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1)
    ddp = make_ddp_config(PrecisionConfig(grad_reduce_in_fp32=fp32_grads), distributed_optimizer=False)
    return cls(config=config, ddp_config=ddp, module=module, pg_collection=rt.pg_collection)


def _step(ddp, batches, use_b, fail_after=None):
    ddp.zero_grad_buffer()
    for i, x in enumerate(batches):
        if fail_after is not None and i == fail_after:
            return  # an exception left the step here: no sync
        _forward(ddp.module, x, use_b).backward()
    ddp.finish_grad_sync()


@pytest.mark.parametrize("fp32_grads", [False, True], ids=["bf16-style-buffer", "fp32-buffer"])
def test_buffers_equal_megatron_ddp(single_rank_runtime, fp32_grads):
    from megatron.core.distributed import DistributedDataParallel

    from r1mega.models.ddp import FirstWriteDDP

    rt = single_rank_runtime()
    base = _module()
    ours = _wrap(FirstWriteDDP, copy.deepcopy(base), rt, fp32_grads)
    ref = _wrap(DistributedDataParallel, copy.deepcopy(base), rt, fp32_grads)
    assert ours.first_write
    for m in (ours, ref):  # as megatron marks the last pipeline stage's copy of tied embeddings
        m.module["c"].weight.zero_out_wgrad = True
    g = torch.Generator().manual_seed(1)
    plan = [  # (micro-batches, b used, fail after micro-batch)
        (1, True, None), (3, True, None), (2, False, None), (2, True, 1), (1, False, None),
        (2, True, None)]
    for n, use_b, fail in plan:
        batches = [torch.randn(8, 16, generator=g) for _ in range(n)]
        _step(ours, batches, use_b, fail)
        _step(ref, batches, use_b, fail)
        if fail is not None:
            continue
        for (name, p), q in zip(ours.module.named_parameters(), ref.module.parameters()):
            assert torch.equal(p.main_grad, q.main_grad), (name, n, use_b)
            if name.startswith("b.") and not use_b:
                assert not p.main_grad.any(), name
        for b_ours, b_ref in zip(ours.buffers, ref.buffers):
            assert torch.equal(b_ours.grad_data, b_ref.grad_data)


def test_no_buffer_pass_before_the_forward(single_rank_runtime, monkeypatch):
    """The saving itself: zero_grad_buffer no longer zeroes the buffer (megatron's does)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

    from r1mega.models.ddp import FirstWriteDDP

    rt = single_rank_runtime()
    resets = []
    monkeypatch.setattr(_ParamAndGradBuffer, "reset", lambda self: resets.append(self))
    for cls, expected in ((FirstWriteDDP, 0), (DistributedDataParallel, 1)):
        resets.clear()
        _wrap(cls, _module(), rt, False).zero_grad_buffer()
        assert len(resets) == expected, cls.__name__


def test_fused_accumulation_keeps_megatron_zeroing(single_rank_runtime):
    """Modules that add into main_grad themselves (gradient_accumulation_fusion) need zeros."""
    from megatron.core.transformer import TransformerConfig

    from r1mega.config import PrecisionConfig
    from r1mega.models.ddp import FirstWriteDDP
    from r1mega.models.gpt import make_ddp_config

    rt = single_rank_runtime()
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1)
    config.gradient_accumulation_fusion = True  # set after init: its check wants apex
    ddp = FirstWriteDDP(config=config, ddp_config=make_ddp_config(PrecisionConfig(), False),
                        module=_module(), pg_collection=rt.pg_collection)
    for p in ddp.module.parameters():
        p.main_grad.fill_(7.0)
    ddp.zero_grad_buffer()
    assert not ddp.first_write
    assert all(not p.main_grad.any() for p in ddp.module.parameters())


def test_grad_norm_over_whole_buffers(single_rank_runtime):
    """device_step.whole_buffers: a buffer whose every gradient counts becomes one flat tensor
    (same norm: its padding is zero); one holding a gradient the norm leaves out does not."""
    from r1mega.models.ddp import FirstWriteDDP
    from r1mega.parallel.fused_fallbacks import foreach_l2_norm
    from r1mega.train.device_step import whole_buffers

    rt = single_rank_runtime()
    ddp = _wrap(FirstWriteDDP, _module(), rt, False)
    _step(ddp, [torch.randn(8, 16, generator=torch.Generator().manual_seed(4))], True)
    grads = [p.main_grad for p in ddp.module.parameters()]
    flag = torch.zeros(1, dtype=torch.int)
    want = foreach_l2_norm(None, flag, [grads], False)[0]
    merged = whole_buffers(grads, ddp.buffers)
    assert len(merged) == len(ddp.buffers) and merged[0] is ddp.buffers[0].grad_data
    assert merged[0].numel() >= sum(g.numel() for g in grads)  # padding included
    torch.testing.assert_close(foreach_l2_norm(None, flag, [merged], False)[0], want, rtol=1e-6, atol=0)
    partial = grads[1:]  # e.g. a tensor-parallel duplicate the norm skips
    assert whole_buffers(partial, ddp.buffers) == partial
    assert whole_buffers(grads, None) is grads


def test_a_module_adding_into_main_grad_first_is_refused(single_rank_runtime):
    """A module that accumulates into main_grad itself would add onto the last step's values:
    refused with a clear error instead of a silently wrong gradient."""
    from r1mega.models.ddp import FirstWriteDDP

    rt = single_rank_runtime()
    ddp = _wrap(FirstWriteDDP, _module(), rt, False)
    ddp.zero_grad_buffer()
    w = ddp.module["a"].weight
    w.register_hook(lambda g: setattr(w, "grad_added_to_main_grad", True))
    with pytest.raises(RuntimeError, match="gradient_accumulation_fusion"):
        _forward(ddp.module, torch.randn(8, 16), True).backward()
