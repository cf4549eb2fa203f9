"""The batch-first output layer (r1mega/models/batch_first_logits.py) against megatron's own
GPTModel output path, the independent reference: the same logits bit for bit on (B, S) batches and
the same gradients to rounding (weight gradients sum the tokens in batch-first order), megatron's layout kept for one sequence and under sequence parallelism, and no
copy of the logits left in megatron's final transpose."""
from __future__ import annotations

import pytest
import torch


def _model(rt):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=64, vocab_size=96)
    torch.manual_seed(0)
    return build_model(cfg, rt, wrap=False)[0]


def _run(model, ids):
    logits = model(input_ids=ids, position_ids=None, attention_mask=None)
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    logits.backward(g)
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_equals_megatron_output_layer(single_rank_runtime):
    from r1mega.models.batch_first_logits import _BatchFirstLogits

    rt = single_rank_runtime()
    ours = _model(rt)
    assert isinstance(ours.output_layer, _BatchFirstLogits)
    ref = _model(rt)  # same seed, same weights
    ref.output_layer.__class__ = type(ours.output_layer).__mro__[2]  # megatron's own class
    assert not isinstance(ref.output_layer, _BatchFirstLogits)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    got, got_g = _run(ours, ids)
    want, want_g = _run(ref, ids)
    assert got.shape == (3, 7, 128) and got.is_contiguous()  # the vocabulary padded to 128
    assert torch.equal(got, want)
    for name in want_g:
        # every token's gradient is the same; weight gradients sum the tokens in another
        # memory order (batch-first below the output layer): equal to rounding
        torch.testing.assert_close(got_g[name], want_g[name], rtol=1e-5, atol=1e-5, msg=name)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_megatron_transpose_copies_nothing(single_rank_runtime, monkeypatch):
    """The (S, B, V) view the layer returns is batch-first in memory: megatron's
    transpose(0, 1).contiguous() hands back the layer's own storage."""
    rt = single_rank_runtime()
    model = _model(rt)
    seen = {}
    inner = type(model.output_layer).__mro__[2].forward

    def spy(self, *a, **k):
        out = inner(self, *a, **k)
        seen["ptr"] = out[0].data_ptr()
        return out

    monkeypatch.setattr(type(model.output_layer).__mro__[2], "forward", spy)
    logits = model(input_ids=torch.randint(0, 96, (2, 5)), position_ids=None, attention_mask=None)
    assert logits.data_ptr() == seen["ptr"]


@pytest.mark.parametrize("case", ["one-sequence", "sequence-parallel"])
def test_megatron_layout_kept(single_rank_runtime, case):
    rt = single_rank_runtime()
    model = _model(rt)
    layer, weight = model.output_layer, model.shared_embedding_or_output_weight()
    x = torch.randn(5, 1 if case == "one-sequence" else 2, 32)  # (S, B, H)
    if case == "sequence-parallel":
        layer.sequence_parallel = True  # one rank: megatron's gather is the identity
    calls = []
    base_forward = type(layer).__mro__[2].forward

    def spy(self, input_, *a, **k):
        calls.append(input_.shape)
        return base_forward(self, input_, *a, **k)

    type(layer).__mro__[2].forward, saved = spy, base_forward
    try:
        out, _ = layer(x, weight=weight)
    finally:
        type(layer).__mro__[2].forward = saved
    assert calls == [x.shape] and out.shape[:2] == x.shape[:2]
