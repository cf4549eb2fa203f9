"""FP8 rollout weights (r1mega/precision/rollout.py), FP8 emulated on the CPU (and through torch's
CPU scaled matmul for R1MEGA_FP8_ROLLOUT_ACT=row).

References: the layer's own bf16/fp32 path (outside ``decoding`` nothing may change) and the
explicit quantise -> dequantise -> matmul of the same recipe (inside it).
"""
from __future__ import annotations

import json

import pytest
import torch

from r1mega.precision.linear import new_weight_generation
from r1mega.precision.policy import Fp8Policy
from r1mega.precision.quantize import dequantize, quantize_reference
from r1mega.precision.rollout import Fp8RolloutWeights

POLICY = Fp8Policy(recipe="blockwise", backend="native", emulate=True, rollout=True)


@pytest.fixture
def model(single_rank_runtime):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime()
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=256, vocab_size=128, max_position_embeddings=128)
    chunks = _Chunks(build_model(cfg, rt, wrap=False))
    chunks.rt = rt
    return chunks


class _Chunks(list):
    pass


def _logits(m, ids):
    return m(input_ids=ids, position_ids=None, attention_mask=None)


def test_decode_uses_fp8_copies_and_training_is_untouched(model):
    m = model[0]
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = _logits(m, ids)
    fp8 = Fp8RolloutWeights(m, POLICY)
    assert len(fp8.linears) == 8                                  # 4 per layer
    with torch.no_grad():
        outside = _logits(m, ids)
        with fp8.decoding():
            inside = _logits(m, ids)
    torch.testing.assert_close(outside, before, rtol=0, atol=0)
    rel = ((inside - before).norm() / before.norm()).item()
    assert 1e-4 < rel < 0.05, rel
    with fp8.decoding():                                          # grad on: a training forward
        torch.testing.assert_close(_logits(m, ids).detach(), before, rtol=0, atol=0)
    fp8.remove()
    with torch.no_grad():
        torch.testing.assert_close(_logits(m, ids), before, rtol=0, atol=0)


def test_refuses_a_model_with_transformer_engine_layers(model):
    """TE's fused linears are not megatron's ColumnParallelLinear: the copies would not reach
    them and the decode would run bf16 under an FP8 label, so the constructor refuses."""
    fake = type("TELayerNormColumnParallelLinear", (torch.nn.Module,), {})
    fake.__module__ = "megatron.core.extensions.transformer_engine"
    model[0].decoder.layers[0].add_module("te_linear", fake())
    with pytest.raises(ValueError, match="Transformer Engine modules \\(TELayerNormColumnParallelLinear\\)"):
        Fp8RolloutWeights(model[0], POLICY)


def test_refuses_a_decoder_without_parallel_linears():
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
    holder = torch.nn.Module()
    holder.decoder = decoder
    with pytest.raises(ValueError, match="no megatron parallel linear"):
        Fp8RolloutWeights(holder, POLICY)


def test_fp8_linear_call_equals_explicit_quantised_matmul(model):
    lin = model[0].decoder.layers[0].mlp.linear_fc2              # RowParallelLinear (128 <- 256)
    fp8 = Fp8RolloutWeights(model[0], POLICY)
    x = torch.randn(7, 1, 256)
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x)
    a = quantize_reference(x.reshape(7, 256), "tile", power2=True)
    w = quantize_reference(lin.weight.detach(), "block", power2=True)
    ref = dequantize(a) @ dequantize(w).t()
    torch.testing.assert_close(y.reshape(7, 128), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("emulate", [True, False])
def test_rollout_linear_takes_row_scaled_activations_under_the_switch(model, monkeypatch, emulate):
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    policy = Fp8Policy(recipe="tensorwise", backend="native", emulate=emulate, rollout=True)
    fp8 = Fp8RolloutWeights(model[0], policy)
    assert (fp8.act, fp8.act_power2) == ("row", True)
    lin = model[0].decoder.layers[0].mlp.linear_fc2              # RowParallelLinear (128 <- 256)
    x = torch.randn(7, 1, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), fp8.decoding():
        y, _ = lin(x)
    a = quantize_reference(x.reshape(7, 256), "row", power2=True)
    w = quantize_reference(lin.weight.detach(), "tensor", power2=policy.power2_scales)
    ref = dequantize(a).double() @ dequantize(w).double().t()
    torch.testing.assert_close(y.reshape(7, 128).double(), ref, rtol=1e-5, atol=1e-5)
    fp8.remove()


def test_row_switch_leaves_prefill_sized_calls_on_the_recipes_tensor_scale(model, monkeypatch):
    from r1mega.precision import rollout as rollout_mod

    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    monkeypatch.setattr(rollout_mod, "ROW_ACT_MAX_ROWS", 8)
    policy = Fp8Policy(recipe="tensorwise", backend="native", emulate=True, rollout=True)
    fp8 = Fp8RolloutWeights(model[0], policy)
    lin = model[0].decoder.layers[0].mlp.linear_fc2              # RowParallelLinear (128 <- 256)
    w = dequantize(quantize_reference(lin.weight.detach(), "tensor", power2=policy.power2_scales))
    g = torch.Generator().manual_seed(4)
    for rows, gran, power2 in ((8, "row", True), (9, "tensor", policy.power2_scales)):
        # rows of very different sizes: a tensor scale and row scales round them differently
        x = torch.randn(rows, 1, 256, generator=g) * torch.logspace(-3, 1, rows)[:, None, None]
        with torch.no_grad(), fp8.decoding():
            y, _ = lin(x)
        a = dequantize(quantize_reference(x.reshape(rows, 256), gran, power2=power2))
        other = "tensor" if gran == "row" else "row"
        b = dequantize(quantize_reference(x.reshape(rows, 256), other, power2=True))
        torch.testing.assert_close(y.reshape(rows, 128), a @ w.t(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(y.reshape(rows, 128), b @ w.t(), rtol=1e-5, atol=1e-6)
    fp8.remove()


def test_tensorwise_weights_take_row_scales_by_default(model, monkeypatch):
    from r1mega.precision import triton_act_gemm

    policy = Fp8Policy(recipe="tensorwise", backend="native", emulate=True, rollout=True)
    monkeypatch.delenv("R1MEGA_FP8_ROLLOUT_ACT", raising=False)
    fp8 = Fp8RolloutWeights(model[0], policy)
    assert (fp8.act, fp8.act_power2) == ("row", True)
    fp8.remove()
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "recipe")
    fp8 = Fp8RolloutWeights(model[0], policy)
    assert (fp8.act, fp8.act_power2) == ("tensor", policy.power2_scales)
    fp8.remove()
    # the fused decode GEMM quantises x itself in 1x128 tiles: the default leaves it the recipe's
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "auto")
    monkeypatch.setattr(triton_act_gemm, "gemm_choice", lambda: "fused")
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", emulate=False,
                                                rollout=True))
    assert fp8.fused_gemm and fp8.act == "tensor"
    fp8.remove()


def test_row_chains_hook_only_row_scaled_activations_on_tensorwise_weights(model, monkeypatch):
    """The MLP chain and the unscaled qkv GEMM hand x's row scales to the next kernel: right for
    tensorwise weights (one scale, applied by cuBLAS), wrong for the rowwise recipe (its weights'
    row scales need cuBLAS's rowwise kernel); the rowwise decode on an H100 raised before."""
    from r1mega.precision import rollout as rollout_mod

    monkeypatch.delenv("R1MEGA_FP8_ROLLOUT_ACT", raising=False)
    layer = model[0].decoder.layers[0]
    for recipe, hooked in (("tensorwise", True), ("rowwise", False), ("blockwise", False)):
        fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe=recipe, backend="native", emulate=False,
                                                    rollout=True))
        assert (fp8.mlps == [m.mlp for m in model[0].decoder.layers]) == hooked, recipe
        assert (len(fp8.qkv_linears) == len(model[0].decoder.layers)) == hooked, recipe
        assert ("forward" in layer.mlp.__dict__) == hooked, recipe
        assert (getattr(layer.self_attention.linear_qkv, "_fp8_row_qkv", None) is not None) == hooked
        fp8.remove()
        assert "forward" not in layer.mlp.__dict__
        assert rollout_mod.qkv_unscaled(layer.self_attention.linear_qkv, torch.zeros(1, 1, 128)) is None


def test_switch_leaves_other_weight_scalings_and_refuses_unknown_values(model, monkeypatch):
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="blockwise", backend="native", emulate=True,
                                                rollout=True))
    assert fp8.act == "tile"                                     # blockwise weights: 1x128 tiles
    fp8.remove()
    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "rows")
    with pytest.raises(ValueError, match="R1MEGA_FP8_ROLLOUT_ACT='rows'"):
        Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", emulate=True,
                                              rollout=True))


def test_copies_refreshed_once_per_update_in_place(model):
    m = model[0]
    fp8 = Fp8RolloutWeights(m, POLICY)
    new_weight_generation()
    with fp8.decoding():
        pass
    with fp8.decoding():
        pass
    assert fp8.refreshes == 1                                    # same weights: quantised once
    lin = fp8.linears[0]
    data = lin._fp8_rollout_weight.data
    with torch.no_grad():
        lin.weight.mul_(-0.5)                                    # "the update"
    new_weight_generation()                                      # TrainStep.optimizer_step does this
    with fp8.decoding():
        pass
    assert fp8.refreshes == 2
    assert lin._fp8_rollout_weight.data is data                  # the same tensor: graphs stay valid
    want = quantize_reference(lin.weight.detach(), "block", power2=True)
    assert torch.equal(data.view(torch.uint8), want.data.view(torch.uint8))


def test_engine_generates_with_fp8_weights(model):
    from r1mega.config import RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    cfg = RolloutConfig(kv_block_tokens=4, kv_cpu_tokens=4096, max_new_tokens=6,
                        max_batch_sequences=8, temperature=1.0, cuda_graphs=False)
    fp8 = Fp8RolloutWeights(model[0], POLICY)
    eng = RolloutEngine(list(model), cfg, model.rt, eos_ids=[], vocab_size=128)
    reqs = [GenerationRequest([1, 2, 3, 4, 5], n=2, seed=i) for i in range(2)]
    with fp8.decoding():
        outs = eng.generate(reqs)
    assert len(outs) == 4 and all(len(c.token_ids) == 6 for c in outs)
    assert all(torch.isfinite(torch.tensor(c.logprobs)).all() for c in outs)


@pytest.mark.parametrize("extra", [["precision.fp8_rollout=true", "grpo.tis_cap=2"],
                                   ["precision.fp8=true", "precision.fp8_backend=native"]])
def test_grpo_trains_with_fp8_rollout_or_fp8_training(tmp_path, monkeypatch, extra):
    """Two GRPO steps of the demo config, FP8 emulated: the rollout decodes with FP8 weight
    copies (training bf16), or the whole policy trains with FP8 linears."""
    import os

    from tests.conftest import ROOT, free_port
    from r1mega.config import load_config
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.precision import rollout as fp8_rollout_mod
    from r1mega.train.trainer import run_train

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    refreshes = []
    real = fp8_rollout_mod.Fp8RolloutWeights.refresh

    def counting_refresh(self):
        refreshes.append(1)
        return real(self)

    monkeypatch.setattr(fp8_rollout_mod.Fp8RolloutWeights, "refresh", counting_refresh)
    tiny = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
            "model.num_attention_heads=2", "model.num_query_groups=1", "data.num_examples=64",
            "data.eval_source=null", "data.global_batch_prompts=4", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "train.sft_steps=0", "train.steps=2",
            "logging.samples_every_steps=0", "logging.tensorboard=false",
            "logging.progress_bar=false", "checkpoint.dir=null", "precision.fp8_emulate=true",
            "precision.fp8_recipe=rowwise", f"logging.run_dir={tmp_path / 'run'}"]
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), tiny + extra)
    try:
        assert run_train(cfg) == 0
    finally:
        destroy_parallel()
    # FP8 rollout alone: the copies are quantised once per rollout (after each update)
    assert len(refreshes) == (2 if "precision.fp8_rollout=true" in extra else 0)
    steps = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [m for m in steps if "rollout/logprob_mean_abs_diff" in m]
    assert len(steps) == 2
    for m in steps:
        diff, w_min, w_max = (m[f"rollout/{k}"] for k in ("logprob_mean_abs_diff", "is_weight_min",
                                                           "is_weight_max"))
        if "precision.fp8_rollout=true" in extra:
            # the FP8 weights' log-probs differ from the (unquantised) training forward's, so
            # the importance weights grpo.tis_cap truncates are not 1
            assert diff > 1e-4 and (w_min < 1 < w_max), m
        else:
            # FP8 training: the rollout reads the same FP8 linears the trainer recomputes with
            assert diff < 1e-4, m


def test_attention_output_projection_takes_the_one_pass_row_quantiser(model, monkeypatch):
    """Only linear_proj (its input comes from the opaque attention op) asks decode_gemm for the
    one-pass row kernel; the norm-fed and SwiGLU-fed linears keep the quantiser inductor fuses."""
    from r1mega.precision import rollout as rollout_mod

    monkeypatch.setenv("R1MEGA_FP8_ROLLOUT_ACT", "row")
    calls = []
    real = rollout_mod.decode_gemm
    monkeypatch.setattr(rollout_mod, "decode_gemm",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    fp8 = Fp8RolloutWeights(model[0], Fp8Policy(recipe="tensorwise", backend="native", emulate=True,
                                                 rollout=True))
    layer = model[0].decoder.layers[1]
    x = torch.randn(5, 1, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), fp8.decoding():
        for lin, rows_kernel in ((layer.self_attention.linear_proj, True),
                                 (layer.self_attention.linear_qkv, False),
                                 (layer.mlp.linear_fc1, False)):
            calls.clear()
            lin(x)
            assert calls == [rows_kernel], lin
    fp8.remove()
