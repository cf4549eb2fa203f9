"""Transformer Engine on the GPU (skipped unless CUDA and TE import): r1mega's TE layer spec
against its local spec on the same weights, TE's FP8 engaged by ``precision.fp8`` (not silently
bf16), a model on TE's spec training in FP8, and the rollout engine generating from it."""
from __future__ import annotations

import pytest
import torch

from r1mega.models.spec import transformer_engine_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not transformer_engine_available(),
                                reason="needs CUDA and Transformer Engine")

# packed (THD) sequences of mixed lengths, as r1mega trains; 384 tokens in all, since TE's FP8
# GEMMs take whole multiples of 8 rows (128 for its blockwise recipe)
LENGTHS = [37, 200, 5, 90, 52]


def _config(spec: str):
    from r1mega.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=512, vocab_size=1024, max_position_embeddings=512, spec=spec)


def _te_state(local_state: dict) -> dict:
    """The local spec's state dict under TE's names (the norms fused into the next linear)."""
    from r1mega.convert.families import TE_RENAMES

    out = {}
    for name, t in local_state.items():
        for old, new in TE_RENAMES.items():
            if name.endswith(old):
                name = name[: -len(old)] + new
        out[name] = t
    return out


def _logits(gpt, ids):
    from r1mega.models.attention import make_packed_seqs

    return gpt(input_ids=ids, position_ids=None, attention_mask=None,
               packed_seq_params=make_packed_seqs(LENGTHS, "cuda"))


def _models(rt, *precisions):
    """A local GPTModel and one TE-spec GPTModel per precision, all holding the local one's
    weights (loaded: on CUDA megatron draws them from its model-parallel RNG tracker, which
    torch.manual_seed does not reset, so two builds would not give the same weights)."""
    from r1mega.models.gpt import build_model

    local = build_model(_config("local"), rt, wrap=False)[0]
    state = _te_state(local.state_dict())
    tes = []
    for precision in precisions:
        te = build_model(_config("te"), rt, precision, wrap=False)[0]
        missing, unexpected = te.load_state_dict(state, strict=False)
        # TE keeps extra state (FP8 metadata) that a local model has no counterpart for
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        tes.append(te)
    return local, tes


def _pair(rt, precision=None):
    """(local GPTModel, TE-spec GPTModel under ``precision``) holding the same weights."""
    local, (te,) = _models(rt, precision)
    return local, te


def test_te_spec_equals_local_spec_on_packed_sequences(single_rank_runtime):
    """Forward logits and the gradients of every weight, bf16, on packed sequences of mixed
    lengths: TE's fused layers against r1mega's local ones (different kernels and fusions, so
    equal within bf16's rounding, not bit for bit)."""
    from r1mega.config import PrecisionConfig

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    local, te = _pair(rt)
    ids = torch.randint(0, 1024, (1, sum(LENGTHS)), device="cuda")
    out = {}
    for name, gpt in (("local", local), ("te", te)):
        logits = _logits(gpt, ids).float()
        logits.logsumexp(-1).mean().backward()
        grads = {n: p.grad.float() for n, p in gpt.named_parameters()}
        out[name] = (logits, _te_state(grads) if name == "local" else grads)
    torch.testing.assert_close(out["te"][0], out["local"][0], atol=5e-2, rtol=5e-2)
    for n, g in out["local"][1].items():
        ref = out["te"][1][n]
        scale = ref.abs().max().clamp(min=1e-6)
        assert (g - ref).abs().max() / scale < 5e-2, n


@pytest.mark.parametrize("recipe", ["current", "delayed", "blockwise"])
def test_te_fp8_is_engaged_and_close_to_bf16(single_rank_runtime, recipe):
    """precision.fp8 with the TE backend runs TE's FP8 GEMMs: the logits differ from the same
    weights' bf16 logits by more than bf16 noise (had fp8_autocast never been entered they would
    be the bf16 ones bit for bit) and by no more than e4m3's few-percent error."""
    from r1mega.config import PrecisionConfig

    if recipe == "blockwise" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TE's blockwise FP8 recipe runs on Hopper")
    prec = PrecisionConfig(dtype="bf16", fp8=True, fp8_backend="te", fp8_recipe=recipe)
    rt = single_rank_runtime(precision=prec)
    _, (te_bf16, te_fp8) = _models(rt, None, prec)
    bf16_state, fp8_state = te_bf16.state_dict(), te_fp8.state_dict()
    for name, t in bf16_state.items():  # one set of weights: only the GEMMs' precision differs
        if torch.is_tensor(t) and t.is_floating_point():
            assert torch.equal(t, fp8_state[name]), name
    ids = torch.randint(0, 1024, (1, sum(LENGTHS)), device="cuda")
    with torch.no_grad():
        a = _logits(te_bf16, ids).float()
        b = _logits(te_fp8, ids).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 0.15, rel


def test_te_fp8_model_trains_and_generates(single_rank_runtime):
    """A TE-spec model in FP8 (current scaling) trains (loss falls, finite) and the rollout
    engine, which calls the layers' own modules, generates from it in bf16."""
    from r1mega.config import OptimizerConfig, PrecisionConfig, RolloutConfig
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from r1mega.train.roles import Policy
    from r1mega.train.step import sft_loss_fn, sft_sample

    prec = PrecisionConfig(dtype="bf16", fp8=True, fp8_backend="te", fp8_recipe="current")
    rt = single_rank_runtime(precision=prec)
    torch.manual_seed(0)
    policy = Policy.build(_config("te"), prec, OptimizerConfig(lr=3e-3), rt,
                          distributed_optimizer=True, micro_batch_tokens=512, total_steps=8)
    g = torch.Generator().manual_seed(1)
    samples = [sft_sample(torch.randint(0, 64, (n,), generator=g)) for n in (40, 64, 17, 90)]
    losses = [policy.update(samples, sft_loss_fn(1024)).loss for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    eng = RolloutEngine(policy.modules(), RolloutConfig(max_new_tokens=12, kv_block_tokens=16,
                                                        max_batch_sequences=16), rt, eos_ids=[],
                        vocab_size=1024)
    outs = eng.generate([GenerationRequest([1, 2, 3, 4 + i], n=2, seed=i) for i in range(3)])
    eng.release()
    assert len(outs) == 6 and all(len(c.token_ids) == 12 for c in outs)
    assert all(torch.isfinite(torch.tensor(c.logprobs)).all() for c in outs)
