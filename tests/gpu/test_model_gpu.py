"""GPU attention paths vs the SDPA reference, and the packed model on GPU (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from r1mega.models import attention as A  # noqa: E402


def _qkv(lengths, hq=16, hkv=4, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = sum(lengths)
    return [torch.randn(T, h, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
            for h in (hq, hkv, hkv)]


def _reference(q, k, v, lengths):
    """fp32 block-diagonal-mask SDPA (the CPU path), on copies."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = A.sdpa_packed(q32, k32, v32, lengths, None)
    return out, (q32, k32, v32)


BACKENDS = ["sdpa", "varlen", "flash"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[300, 17, 1024, 5, 700], [512] * 4])
def test_gpu_attention_matches_sdpa_reference(backend, lengths):
    if backend == "varlen" and A._torch_varlen is None:
        pytest.skip("torch.nn.attention.varlen not available")
    if backend == "flash" and A._flash_varlen is None:
        pytest.skip("flash-attn not installed")
    q, k, v = _qkv(lengths)
    cu = A.make_packed_seqs(lengths, "cuda").cu_seqlens_q
    if backend == "sdpa":
        out = A.sdpa_packed(q, k, v, lengths, None)
    elif backend == "varlen":
        out = A.varlen_packed(q, k, v, cu, max(lengths), None)
    else:
        out = A.flash_packed(q, k, v, cu, max(lengths), None)
    ref, ref_inputs = _reference(q, k, v, lengths)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for ours, theirs, name in zip((q, k, v), ref_inputs, "qkv"):
        err = (ours.grad.float() - theirs.grad).abs().max() / theirs.grad.abs().max()
        assert err < 3e-2, f"d{name} relative error {err:.3g} ({backend})"


def test_core_attention_auto_choice_on_gpu():
    from r1mega.models.attention import PackedCoreAttention

    class Cfg:
        context_parallel_size = 1
        attention_dropout = 0.0

    mod = PackedCoreAttention.__new__(PackedCoreAttention)
    torch.nn.Module.__init__(mod)
    mod.backend, mod.softmax_scale = "auto", None
    dev = torch.device("cuda")
    assert mod._choose(dev, equal_lengths=True) == "sdpa"
    assert mod._choose(dev, equal_lengths=False) in ("flash", "varlen")


def test_packed_model_on_gpu_matches_per_sequence(single_rank_runtime):
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import build_model

    rt = single_rank_runtime()
    assert rt.device.type == "cuda" and rt.dtype == torch.bfloat16
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, vocab_size=1000, qk_norm=True)
    model = build_model(cfg, rt, wrap=False)[0].eval()
    lengths = [37, 200, 5]
    ids = torch.randint(0, cfg.vocab_size, (1, sum(lengths)), device="cuda")
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=None, attention_mask=None,
                       packed_seq_params=A.make_packed_seqs(lengths, "cuda"))
        alone, s = [], 0
        for n in lengths:
            alone.append(model(input_ids=ids[:, s:s + n], position_ids=None, attention_mask=None,
                               packed_seq_params=A.make_packed_seqs([n], "cuda")))
            s += n
    torch.testing.assert_close(packed.float(), torch.cat(alone, 1).float(), atol=3e-2, rtol=3e-2)


def test_train_step_bf16_on_gpu(single_rank_runtime):
    """bf16 params, fp32 masters (distributed optimizer), fused AdamW: loss falls; the (B, S)
    and THD layouts of the same equal-length batch give the same first loss."""
    from r1mega.config import ModelConfig, OptimizerConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, sft_loss_fn, sft_sample

    rt = single_rank_runtime()
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, vocab_size=1000)
    g = torch.Generator().manual_seed(0)
    samples = [sft_sample(torch.randint(0, 1000, (128,), generator=g)) for _ in range(4)]
    first = {}
    for batched in (True, False):
        torch.manual_seed(0)
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        chunks = build_model(cfg, rt, wrap=True)
        optim = build_optimizer(OptimizerConfig(lr=1e-3), chunks, rt)
        step = TrainStep(chunks, optim, rt, micro_batch_tokens=512, batch_equal_lengths=batched)
        losses = [step(samples, sft_loss_fn(cfg.vocab_size)).loss for _ in range(5)]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        first[batched] = losses[0]
    assert abs(first[True] - first[False]) < 2e-2 * abs(first[False])


def test_train_step_on_gpu_never_waits_for_the_device(single_rank_runtime):
    """The bf16 GPU step (fused AdamW) takes the sync-free path: with torch's sync debug mode set
    to "error", forward, backward, clip and Adam of a warmed-up step raise on any device->host
    synchronisation. Its results, read afterwards, are finite and the loss falls."""
    from r1mega.config import ModelConfig, OptimizerConfig
    from r1mega.models.gpt import build_model
    from r1mega.train.optimizer import build_optimizer
    from r1mega.train.step import TrainStep, check_label_ids, sft_loss_fn, sft_sample

    rt = single_rank_runtime()
    cfg = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=512, vocab_size=1000)
    g = torch.Generator().manual_seed(0)
    samples = [sft_sample(torch.randint(0, 1000, (128,), generator=g)) for _ in range(4)]
    check_label_ids(samples, cfg.vocab_size)
    chunks = build_model(cfg, rt, wrap=True)
    step = TrainStep(chunks, build_optimizer(OptimizerConfig(lr=1e-3, clip_grad=0.5), chunks, rt),
                     rt, micro_batch_tokens=512)
    assert step.sync_free
    loss_fn = sft_loss_fn(cfg.vocab_size, host_checked=True)
    results = [step(samples, loss_fn) for _ in range(2)]  # warm-up: allocations, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results += [step(samples, loss_fn) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = [r.loss for r in results]
    assert all(r.update_successful for r in results)
    assert all(torch.isfinite(torch.tensor([r.grad_norm for r in results])))
    assert losses[-1] < losses[0]
