"""The MoE model on GPU in bf16 (skipped without CUDA): the layer's device path (CUDA dispatch
kernels, grouped GEMM experts on sm_90+) against a per-expert float32 computation of the same
routes, a training step, and rollout decode through CUDA graphs against eager decode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DSV3 = dict(moe_router="sigmoid_group", moe_num_groups=4, moe_topk_groups=2,
            moe_routed_scaling_factor=2.5, moe_bias_update_rate=0.01,
            moe_shared_expert_ffn_hidden_size=128, moe_first_k_dense=1)


def moe_model(**kw):
    from r1mega.config import ModelConfig

    base = dict(family="qwen3_moe", num_layers=3, hidden_size=256, num_attention_heads=4,
                num_query_groups=2, kv_channels=64, ffn_hidden_size=512, vocab_size=1000,
                max_position_embeddings=256, qk_norm=True, spec="local", num_experts=16,
                moe_router_topk=4, moe_ffn_hidden_size=128)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [{}, DSV3], ids=["softmax", "dsv3"])
def test_layer_device_path_equals_per_expert_float32(single_rank_runtime, kw):
    from r1mega.config import PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    model = build_model(moe_model(**kw), rt, wrap=False)
    layer = moe_layers(model)[0]
    assert layer.host_sync_free(torch.bfloat16) == (torch.cuda.get_device_capability()[0] >= 9)
    x = torch.randn(64, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = layer(x)
    x2 = x.detach().reshape(-1, 256)
    _, w, idx = layer.route(x2)
    ref = torch.zeros(x2.shape[0], 256, device="cuda")
    gu, dn = layer.experts.gate_up.float(), layer.experts.down.float()
    for t in range(x2.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = gu[e] @ x2[t].float()
            ref[t] += w[t, j] * (dn[e] @ (F.silu(h[:128]) * h[128:]))
    if layer.shared_expert is not None:
        s = layer.shared_expert
        h = x2.float() @ s.gate_up.float().T
        ref += (F.silu(h[:, :128]) * h[:, 128:]) @ s.down.float().T
    # The output is small (init std 0.02): an absolute 3e-2 would pass a zero output. bf16
    # rounds h, the SwiGLU and the output (~2^-8 relative each); scale the tolerance to the output.
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(out.reshape(-1, 256).float(), ref, atol=2e-2 * scale, rtol=2e-2)
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and layer.router_weight.grad.abs().sum() > 0
    assert layer.experts.gate_up.grad.abs().sum() > 0


def test_training_step_and_graph_decode(single_rank_runtime):
    from r1mega.config import Config, OptimizerConfig, PrecisionConfig, RolloutConfig
    from r1mega.moe.balancing import moe_layers
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest
    from r1mega.train.roles import Policy
    from r1mega.train.step import sft_loss_fn, sft_sample

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    model_cfg = moe_model(**DSV3)
    # lr 1e-2: Adam's first step moves every weight by ~lr, which must exceed half the bf16
    # spacing at 1.0 (2^-8) for the norm weights' bf16 copies to change at all.
    policy = Policy.build(model_cfg, PrecisionConfig(dtype="bf16"), OptimizerConfig(lr=1e-2), rt,
                          distributed_optimizer=True, micro_batch_tokens=512, total_steps=2)
    before = {n: p.detach().clone() for n, p in policy.modules()[0].named_parameters()}
    g = torch.Generator().manual_seed(1)
    samples = [sft_sample(torch.randint(0, 1000, (n,), generator=g)) for n in (40, 64, 17, 90)]
    res = policy.update(samples, sft_loss_fn(1000))
    assert res.update_successful and res.loss == res.loss
    after = dict(policy.modules()[0].named_parameters())
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)
    assert all(layer.expert_bias.abs().max() > 0 for layer in moe_layers(policy.chunks))

    def decode(**kw):
        cfg = RolloutConfig(max_new_tokens=16, kv_block_tokens=16, max_batch_sequences=32,
                            temperature=0.0, **kw)
        eng = RolloutEngine(policy.modules(), cfg, rt, eos_ids=[], vocab_size=1000)
        prompts = [[(i * 37 + j) % 1000 for j in range(5 + 11 * i)] for i in range(6)]
        outs = eng.generate([GenerationRequest(p, n=1) for p in prompts])
        used = eng.graphs is not None
        eng.release()
        return [c.token_ids for c in outs], used

    eager, g0 = decode(cuda_graphs=False, compile_decode=False)
    graphed, g1 = decode(cuda_graphs=True, compile_decode=False)
    assert not g0
    assert g1 == (torch.cuda.get_device_capability()[0] >= 9)
    assert graphed == eager
    compiled, _ = decode(cuda_graphs=True, compile_decode=True)
    same = sum(a == b for a, b in zip(compiled, eager))
    print(f"compiled decode: {same}/{len(eager)} sequences equal eager greedy (bf16)")
    assert all(len(c) == 16 for c in compiled)


def _step_loss_and_grads(model, tokens: torch.Tensor, lengths: list[int], vocab: int):
    """Mean next-token NLL over a packed (THD) batch, its backward; -> (loss, {name: grad})."""
    from r1mega.models.attention import make_packed_seqs

    for p in model.parameters():
        p.grad = None
    logits = model(input_ids=tokens[None, :], position_ids=None, attention_mask=None,
                   packed_seq_params=make_packed_seqs(lengths, "cuda"))
    logp = torch.log_softmax(logits.reshape(tokens.numel(), -1)[:, :vocab].float(), -1)  # (T, V)
    ends = torch.cumsum(torch.tensor(lengths), 0).tolist()
    keep = torch.ones(tokens.numel() - 1, dtype=torch.bool, device="cuda")
    keep[[e - 1 for e in ends[:-1]]] = False             # no target across a sequence boundary
    nll = -logp[:-1].gather(1, tokens[1:, None])[:, 0]
    loss = nll[keep].mean()
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, DSV3], ids=["softmax", "dsv3"])
def test_training_forward_backward_device_path_equals_reference_path(single_rank_runtime,
                                                                     monkeypatch, kw):
    """The whole MoE model's training forward and backward in bf16 on CUDA: the device path
    (CUDA dispatch kernels, torch._grouped_mm experts) against the PyTorch references that the
    CPU runs (torch dispatch, one matmul pair per expert), same weights, same tokens.

    Routing is recomputed in each run, and after the first MoE layer the two paths' inputs
    differ by bf16 rounding, so a token whose k-th and (k+1)-th expert scores are within that
    rounding may pick another expert; the comparison is therefore on the loss and on each
    parameter's gradient as a whole (relative norm), not element by element."""
    from r1mega.config import PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    model = build_model(moe_model(**kw), rt, wrap=False)[0]
    layers = moe_layers([model])
    assert layers and all(p.dtype == torch.bfloat16 for p in layers[0].experts.parameters())
    g = torch.Generator().manual_seed(2)
    lengths = [96, 160, 33, 223]
    tokens = torch.randint(0, 1000, (sum(lengths),), generator=g).cuda()

    calls = {"n": 0}
    real_grouped_mm = getattr(torch, "_grouped_mm", None)
    if real_grouped_mm is not None:
        def counting(*a, **k):
            calls["n"] += 1
            return real_grouped_mm(*a, **k)
        monkeypatch.setattr(torch, "_grouped_mm", counting)

    loss_dev, grads_dev = _step_loss_and_grads(model, tokens, lengths, 1000)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert (calls["n"] > 0) == hopper  # the device path really ran the grouped GEMM on sm_90+
    for layer in layers:
        layer.experts.impl, layer.dispatcher.impl = "loop", "torch"
        if layer.expert_load_accum is not None:
            layer.expert_load_accum.zero_()
    calls["n"] = 0
    loss_ref, grads_ref = _step_loss_and_grads(model, tokens, lengths, 1000)
    assert calls["n"] == 0

    assert loss_dev == pytest.approx(loss_ref, rel=1e-2)
    assert set(grads_dev) == set(grads_ref)
    expert_grads = [n for n in grads_ref if "experts." in n or "router_weight" in n]
    assert expert_grads
    for name, ref in grads_ref.items():
        err = (grads_dev[name] - ref).norm() / ref.norm().clamp_min(1e-12)
        assert ref.norm() > 0, name
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("kw", [dict(moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001), DSV3],
                         ids=["softmax+balance-losses", "dsv3-bias"])
def test_moe_train_step_never_waits_for_the_device(single_rank_runtime, kw):
    """The bench's path (r1mega bench train-step --model qwen3-moe-small) has no host sync per
    MoE layer: with torch's sync debug mode set to "error", a warmed-up training step of the MoE
    model (router, CUDA routing metadata, permute, grouped GEMM experts, combine, balance losses
    or the expert-bias update, clip and fused Adam) raises on any device->host synchronisation."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the per-expert loop (no torch._grouped_mm before sm_90) reads offsets on the host")
    from r1mega.config import OptimizerConfig, PrecisionConfig
    from r1mega.models.gpt import build_model
    from r1mega.moe.balancing import moe_layers
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, check_label_ids, sft_loss_fn, sft_sample

    rt = single_rank_runtime(precision=PrecisionConfig(dtype="bf16"))
    torch.manual_seed(0)
    cfg = moe_model(**kw)
    g = torch.Generator().manual_seed(0)
    samples = [sft_sample(torch.randint(0, 1000, (128,), generator=g)) for _ in range(4)]
    check_label_ids(samples, cfg.vocab_size)
    chunks = build_model(cfg, rt, wrap=True)
    assert all(layer.host_sync_free(torch.bfloat16) for layer in moe_layers(chunks))
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-3, clip_grad=0.5), chunks, rt),
                     rt, micro_batch_tokens=512)
    assert step.sync_free
    loss_fn = sft_loss_fn(cfg.vocab_size, host_checked=True)
    results = [step(samples, loss_fn) for _ in range(2)]  # warm-up: allocations, lazy init, JIT
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results += [step(samples, loss_fn) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.update_successful for r in results)
    losses = [r.loss for r in results]
    assert all(x == x for x in losses) and losses[-1] < losses[0]
