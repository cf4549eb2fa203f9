"""The FP8 policy (r1mega/precision/policy.py): validation errors name the key; the TE path.

Transformer Engine is not installed on the CPU machines, so the TE tests stop where TE itself
would be needed: they check that ``precision.fp8`` with TE fills megatron's FP8 fields (which
make megatron's TransformerBlock enter ``fp8_autocast`` with the recipe) and selects the TE
spec, with TE's presence patched in. That the autocast then runs in FP8 is TE's and megatron's
code, checked only on a machine with TE.
"""
from __future__ import annotations

import pytest
import torch

from r1mega.config import ConfigError, PrecisionConfig, load_config
from r1mega.config_checks import validate_fp8
from r1mega.precision import policy as pol


def _p(**kw):
    return PrecisionConfig(fp8=True, **kw)


@pytest.mark.parametrize("kw,te,device,expected", [
    (dict(fp8_backend="native"), False, "cpu", "precision.fp8_emulate=true"),
    (dict(fp8_backend="native", fp8_recipe="delayed", fp8_emulate=True), False, "cpu",
     "precision.fp8_recipe: 'delayed' is not a native FP8 recipe"),
    (dict(fp8_backend="te"), False, "cuda", "precision.fp8_backend=te needs Transformer Engine"),
    (dict(fp8_backend="te", fp8_recipe="rowwise"), True, "cuda",
     "precision.fp8_recipe: 'rowwise' is not a Transformer Engine recipe"),
    (dict(fp8_backend="te", fp8_recipe="delayed", fp8_bf16_first_layers=1), True, "cuda",
     "cannot be used with precision.fp8_recipe=delayed"),
    (dict(fp8_backend="te", fp8_emulate=True), True, "cuda", "precision.fp8_emulate=true is the native"),
    (dict(fp8_backend="te", fp8_rollout=True), True, "cuda", "precision.fp8_rollout=true is implemented"),
    (dict(fp8_grad_format="e3m4", fp8_emulate=True), False, "cpu", "precision.fp8_grad_format"),
    (dict(fp8_backend="tensorrt"), False, "cpu", "precision.fp8_backend: 'tensorrt'"),
    (dict(fp8_bf16_last_layers=-1, fp8_emulate=True), False, "cpu", "precision.fp8_bf16_last_layers"),
])
def test_bad_fp8_settings_name_the_key(kw, te, device, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        pol.resolve_fp8_policy(_p(**kw), device, te_available=te)


def test_fp8_rollout_alone_keeps_training_bf16():
    prec = PrecisionConfig(fp8_rollout=True, fp8_recipe="tensorwise", fp8_emulate=True)
    assert pol.resolve_fp8_policy(prec, "cpu", te_available=False) is None
    r = pol.resolve_rollout_fp8_policy(prec, "cpu")
    assert (r.recipe, r.backend, r.rollout) == ("tensorwise", "native", True)
    with pytest.raises(ConfigError, match="precision.fp8_rollout=true: native FP8 needs a CUDA GPU"):
        pol.resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True), "cpu")
    with pytest.raises(ConfigError, match="'delayed' is not a native FP8 recipe"):
        pol.resolve_rollout_fp8_policy(PrecisionConfig(fp8_rollout=True, fp8_recipe="delayed"), "cpu")
    assert pol.resolve_rollout_fp8_policy(PrecisionConfig(), "cpu") is None


def test_native_needs_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(pol.torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(ConfigError, match="compute capability 8.0"):
        pol.resolve_fp8_policy(_p(fp8_backend="native"), "cuda", te_available=False)
    monkeypatch.setattr(pol.torch.cuda, "get_device_capability", lambda *a: (8, 9))
    with pytest.raises(ConfigError, match="blockwise runs on cuBLAS's Hopper"):
        pol.resolve_fp8_policy(_p(fp8_backend="native", fp8_recipe="blockwise"), "cuda",
                               te_available=False)
    ok = pol.resolve_fp8_policy(_p(fp8_backend="native", fp8_recipe="rowwise"), "cuda",
                                te_available=False)
    assert ok.backend == "native" and ok.recipe == "rowwise" and not ok.power2_scales
    monkeypatch.setattr(pol.torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(ConfigError, match="fp8_grad_format=e5m2.*e4m3 operands only"):
        pol.resolve_fp8_policy(_p(fp8_backend="native", fp8_recipe="blockwise",
                                  fp8_grad_format="e5m2"), "cuda", te_available=False)
    for recipe in ("tensorwise", "blockwise"):   # e5m2 elsewhere, and blockwise with e4m3
        fmt = "e5m2" if recipe == "tensorwise" else "e4m3"
        assert pol.resolve_fp8_policy(_p(fp8_backend="native", fp8_recipe=recipe,
                                         fp8_grad_format=fmt), "cuda", te_available=False)
    # the CPU emulation computes any pair
    assert pol.resolve_fp8_policy(_p(fp8_backend="native", fp8_recipe="blockwise",
                                     fp8_grad_format="e5m2", fp8_emulate=True), "cpu",
                                  te_available=False)


def test_auto_backend_and_emulation():
    assert pol.resolve_fp8_policy(PrecisionConfig(), "cpu") is None
    p = pol.resolve_fp8_policy(_p(fp8_emulate=True), "cpu", te_available=True)
    assert p.backend == "native" and p.emulate and p.recipe == "blockwise" and p.power2_scales
    p = pol.resolve_fp8_policy(_p(fp8_recipe="current"), "cuda", te_available=True)
    assert p.backend == "te" and p.recipe == "current"


def test_layer_range_and_its_validation():
    p = pol.Fp8Policy(recipe="rowwise", backend="native", bf16_first_layers=1, bf16_last_layers=2)
    assert [p.layer_is_fp8(i, 6) for i in range(6)] == [False, True, True, True, False, False]
    cfg = load_config(None, ["precision.fp8=true", "precision.fp8_emulate=true",
                             "model.num_layers=2", "precision.fp8_bf16_first_layers=1",
                             "precision.fp8_bf16_last_layers=1"])
    with pytest.raises(ConfigError, match="keeps every one of model.num_layers=2 in bf16"):
        validate_fp8(cfg, device_type="cpu")


@pytest.mark.parametrize("recipe,grad,expected", [
    ("delayed", "e4m3", dict(fp8="e4m3", fp8_recipe="delayed")),
    ("current", "e5m2", dict(fp8="hybrid", fp8_recipe="tensorwise")),
    ("blockwise", "e4m3", dict(fp8="e4m3", fp8_recipe="blockwise")),
    ("mxfp8", "e4m3", dict(fp8="e4m3", fp8_recipe="mxfp8")),
])
def test_te_backend_sets_megatron_fp8_fields(recipe, grad, expected):
    p = pol.Fp8Policy(recipe=recipe, backend="te", grad_format=grad)
    assert pol.te_transformer_config_kwargs(p, 4) == expected
    assert pol.te_transformer_config_kwargs(pol.Fp8Policy("rowwise", "native"), 4) == {}


def test_te_fp8_reaches_transformer_config_and_te_spec(monkeypatch, single_rank_runtime):
    """With TE (patched in), precision.fp8 must not be a silent no-op: the TransformerConfig
    carries fp8/fp8_recipe (megatron's block wraps its forward in TE's fp8_autocast from them)
    and the layer spec requested is TE's."""
    from r1mega.config import ModelConfig
    from r1mega.models import families, gpt

    monkeypatch.setattr(pol, "transformer_engine_importable", lambda: True)
    rt = single_rank_runtime()
    prec = PrecisionConfig(fp8=True, fp8_backend="te", fp8_recipe="blockwise",
                           fp8_bf16_first_layers=1, fp8_bf16_last_layers=1)
    cfg = gpt.make_transformer_config(ModelConfig(num_layers=4), rt, prec)
    assert (cfg.fp8, cfg.fp8_recipe) == ("e4m3", "blockwise")
    assert cfg.first_last_layers_bf16 and cfg.num_layers_at_start_in_bf16 == 1
    asked = []

    def fake_layer_spec(spec, *a, **k):
        asked.append(spec)
        raise RuntimeError("stop: TE is not installed here")

    monkeypatch.setattr(families, "layer_spec", fake_layer_spec)
    with pytest.raises(RuntimeError, match="stop"):
        gpt.build_gpt_chunks(ModelConfig(num_layers=4, spec="local"), rt, prec)
    assert asked == ["te"]


def test_te_fp8_pads_micro_batches_to_whole_gemm_rows(monkeypatch, single_rank_runtime):
    """TE's FP8 GEMMs refuse inputs whose token count is not a multiple of 8 (of 128 for its
    blockwise quantisers, 32 for MXFP8): with megatron's TransformerConfig carrying TE's FP8
    fields, the trainer's packed micro-batches end in a padding sequence that reaches the
    multiple; without them nothing is padded."""
    import types

    from megatron.core.enums import Fp8Recipe

    from r1mega.train.step import _micro_batches

    assert pol.te_fp8_token_multiple(types.SimpleNamespace(fp8=None)) == 1
    rt = single_rank_runtime()
    samples = [{"input_ids": torch.arange(n)} for n in (37, 200, 5, 90)]
    for recipe, multiple in ((Fp8Recipe.tensorwise, 16), (Fp8Recipe.delayed, 16),
                             (Fp8Recipe.blockwise, 128), ("mxfp8", 32), (None, 1)):
        cfg = types.SimpleNamespace(fp8="e4m3" if recipe else None, fp8_recipe=recipe)
        assert pol.te_fp8_token_multiple(cfg) == multiple
        chunk = types.SimpleNamespace(config=cfg, decoder=object())  # what unwrap stops at
        mbs = _micro_batches(samples, rt, 256, [chunk])
        assert all(mb.num_tokens % multiple == 0 for mb in mbs), (recipe, [mb.num_tokens for mb in mbs])
        real = sorted(n for mb in mbs for n, i in zip(mb.seq_lengths, mb.sample_index) if i >= 0)
        assert real == [5, 37, 90, 200]  # every sample whole, padding apart
        if multiple == 1:
            assert all(-1 not in mb.sample_index for mb in mbs)


def test_fp8_rollout_builds_the_local_spec_its_copies_hook(monkeypatch, single_rank_runtime):
    """precision.fp8_rollout on a GPU where TE imports: model.spec=auto would take TE's fused
    layers, whose GEMMs the FP8 copies never reach (an H100 bench measured a bf16 decode that
    way). Validation pins auto to local, refuses an explicit te, and the builder asks for local."""
    from r1mega.config import ModelConfig
    from r1mega.models import families, gpt

    base = ["precision.fp8_rollout=true", "precision.fp8_emulate=true"]
    cfg = load_config(None, base)
    assert cfg.model.spec == "auto"
    validate_fp8(cfg, device_type="cpu")
    assert cfg.model.spec == "local"
    with pytest.raises(ConfigError, match="model.spec=te.*not covered"):
        validate_fp8(load_config(None, base + ["model.spec=te"]), device_type="cpu")
    plain = load_config(None, [])
    validate_fp8(plain, device_type="cpu")
    assert plain.model.spec == "auto"  # without the FP8 rollout the spec stays the user's

    asked = []

    def fake_layer_spec(spec, *a, **k):
        asked.append(spec)
        raise RuntimeError("stop")

    monkeypatch.setattr(families, "layer_spec", fake_layer_spec)
    rt = single_rank_runtime()
    for prec, spec in ((PrecisionConfig(fp8_rollout=True), "local"), (PrecisionConfig(), "auto")):
        with pytest.raises(RuntimeError, match="stop"):
            gpt.build_gpt_chunks(ModelConfig(num_layers=2, spec="auto"), rt, prec)
        assert asked.pop() == spec
