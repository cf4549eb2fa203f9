"""r1mega.models.compile: megatron's TransformerLayer compiles as ONE graph (no graph breaks),
and the compiled layers give the eager model's loss and gradients."""
import pytest
import torch

from r1mega.config import ModelConfig, PrecisionConfig

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=128, vocab_size=256, tied_embeddings=False, max_position_embeddings=256)


def _build(rt):
    from r1mega.models.gpt import build_model, unwrap

    return unwrap(build_model(ModelConfig(**TINY), rt, PrecisionConfig(dtype="fp32"), wrap=False)[0])


@pytest.fixture(scope="module")
def model(rt_fp32):
    return _build(rt_fp32)


def test_layer_has_no_graph_breaks(model):
    from r1mega.models.compile import layer_graph_breaks

    layer = model.decoder.layers[0]
    x = torch.randn(32, 2, TINY["hidden_size"], requires_grad=True)
    assert layer_graph_breaks(layer, x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(32)) == []


def test_compiled_layers_match_eager(model, rt_fp32):
    from r1mega.models.compile import compile_layers

    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    eager = model
    compiled = _build(rt_fp32)
    compiled.load_state_dict(eager.state_dict())
    assert compile_layers([compiled], dynamic=False) == TINY["num_layers"]
    outs = []
    for m in (eager, compiled):
        logits = m(input_ids=ids, position_ids=None, attention_mask=None)
        loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, rtol=1e-4, atol=1e-5, msg=name)
