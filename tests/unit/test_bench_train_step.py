"""`r1mega bench train-step`: the --smoke runs end to end on CPU (dense and MoE), and the FLOP
and parameter accounting behind the MFU matches transformers' model of the same shape."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_smoke(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", "bench", "train-step", "--smoke", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_moe_smoke_runs_r1mega_beside_each_transformers_experts_implementation():
    out = _run_smoke("--model", "qwen3-moe-small", "--hf-experts", "default,grouped_mm,eager")
    impls = out["impls"]
    assert out["model"] == "qwen3-moe-small" and out["shape"]["num_experts"] == 8
    hf = [k for k in impls if k.startswith("transformers")]
    # 'default' resolves to one named implementation, which is then not timed a second time.
    resolved = {impls[k]["experts_implementation"] for k in hf}
    assert "eager" in resolved and len(hf) == len(resolved) >= 2
    for name, row in impls.items():
        # Random init on uniform random tokens: every model starts near ln(vocab).
        assert abs(row["first_loss"] - math.log(256)) < 0.2, (name, row)
        assert row["ms_per_step"] > 0 and math.isfinite(row["mfu"])
    # r1mega's total-parameter count (behind the static memory estimate) equals the peer's.
    assert out["total_parameters"] == impls[hf[0]]["total_parameters"]
    assert out["active_parameters"] < out["total_parameters"]
    assert out["speed_bar"] == 2.0 and out["best"].startswith("r1mega")
    # On CPU the MoE layers run the per-expert loop and the PyTorch dispatch; the JSON says so.
    assert (out["r1mega_experts"], out["r1mega_dispatch"]) == ("loop", "torch")


def test_dense_smoke_keeps_its_shape_and_peer():
    out = _run_smoke()
    assert out["model"] == "852m" and "num_experts" not in out["shape"]
    assert set(out["impls"]) == {"r1mega[chunked]", "transformers"} or \
        set(out["impls"]) == {"r1mega[fp32]", "transformers"}
    assert out["speed_bar"] == 1.25


def _independent_flops_per_token(shape: dict, seq_len: int) -> float:
    """Active parameters counted by hand from the Qwen3-MoE layer layout."""
    h, L = shape["hidden_size"], shape["num_layers"]
    nh, nkv, d = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
    attn = h * nh * d + 2 * h * nkv * d + nh * d * h + 2 * d      # q, k, v, o, q/k norms
    moe = shape["num_experts"] * h + shape["moe_router_topk"] * 3 * h * shape["moe_ffn_hidden_size"]
    per_layer = attn + moe + 2 * h                                # + the two RMSNorms
    active = L * per_layer + 2 * shape["vocab_size"] * h + h      # untied embeddings, final norm
    return 6 * active + 6 * L * nh * d * seq_len


@pytest.mark.parametrize("name", ["qwen3-moe-small", "852m"])
def test_flops_per_token_counts_active_parameters_and_attention_width(name):
    from r1mega.bench.shapes import get_shape
    from r1mega.bench.flops import model_flops_per_token

    shape = get_shape(name)
    if name == "852m":
        # The dense count is the one the bench always had: 6 N + 6 L h s (heads x 128 = hidden).
        from r1mega.config import ModelConfig
        from r1mega.models.gpt import count_parameters

        want = 6 * count_parameters(ModelConfig(**shape)) + 6 * 16 * 2048 * 2048
    else:
        want = _independent_flops_per_token(shape, 2048)
    assert model_flops_per_token(shape, 2048) == want


def test_moe_peer_has_the_shape_of_the_issue():
    """The transformers peer at the full shape (built on the meta device: no memory) has the
    3.98B parameters the issue's measured baseline had, and r1mega counts the same total."""
    from r1mega.bench.hf_peer import build_hf_model, total_parameters
    from r1mega.bench.shapes import get_shape
    from r1mega.config import ModelConfig
    from r1mega.models.gpt import count_parameters

    shape = get_shape("qwen3-moe-small")
    model, impl = build_hf_model(shape, torch.device("meta"), torch.bfloat16, "eager")
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (64, 8, 768)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 4, 128)
    assert cfg._attn_implementation == "sdpa" and impl == "eager"
    n = total_parameters(model)
    assert round(n / 1e9, 2) == 3.98
    assert count_parameters(ModelConfig(**dict(shape, moe_router_topk=64))) == n


def test_profile_breakdown_sums_cuda_kernels_by_kind():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from r1mega.bench.step_profile import kernel_breakdown

    def ev(name, us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=name, self_device_time_total=us, device_type=device,
                               is_user_annotation=annotation)

    events = [
        ev("void permute_kernel<__nv_bfloat16>(...)", 100.0),
        ev("cutlass::device_kernel<GemmUniversal<GroupProblemShape<...>>>", 3000.0),
        ev("sm90_xmma_gemm_bf16bf16_bf16f32", 2000.0),
        ev("pytorch_flash::flash_fwd_kernel<...>", 500.0),
        ev("void multi_tensor_apply_kernel<...AdamFunctor...>", 1500.0),
        ev("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", 250.0),
        ev("_swiglu_bwd_kernel", 30.0),  # the exact mode's fused SwiGLU (r1mega/ops/triton_swiglu.py)
        ev("some_custom_kernel", 50.0),
        ev("aten::mm", 2000.0, DeviceType.CPU),  # the op, not its kernel: not counted twice
        # a record_function range on the device: its kernels are listed on their own
        ev("Optimizer.step#LeanAdamW.step", 1500.0, annotation=True),
    ]
    kinds = kernel_breakdown(events)
    want = {"moe dispatch": 0.1, "grouped gemm": 3.0, "gemm": 2.0, "attention": 0.5,
            "optimizer": 1.5, "elementwise": 0.28, "other": 0.05, "total": 7.43}
    assert kinds == pytest.approx(want)


def test_profile_top_kernels_owners_and_sync_sites():
    """The profile's kernel list (largest first, device kernels only), each kernel's launching
    op (the one with most of its time), and each host wait with the ops open around it."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from r1mega.bench.step_profile import kernel_owners, sync_sites, top_kernels

    def ev(name, us, count=1, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(key=name, self_device_time_total=us, count=count,
                               device_type=device, is_user_annotation=annotation)

    avg = [ev("gemm_kernel", 3000.0, 4), ev("copy_kernel", 500.0, 2), ev("adam", 9000.0, 111),
           ev("aten::mm", 3000.0, 4, DeviceType.CPU), ev("Optimizer.step", 9000.0, annotation=True)]
    assert top_kernels(avg, top=2) == [(9.0, 111, "adam"), (3.0, 4, "gemm_kernel")]

    def host(name, start, end, kernels=()):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU,
                               time_range=SimpleNamespace(start=start, end=end,
                                                          elapsed_us=lambda: end - start),
                               kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels])

    events = [host("aten::mm", 0, 10, [("gemm_kernel", 700.0)]),
              host("aten::addmm", 20, 30, [("gemm_kernel", 300.0)]),
              host("Optimizer.step", 100, 400),
              host("aten::item", 110, 390),
              host("cudaStreamSynchronize", 120, 380)]
    assert kernel_owners(events) == {"gemm_kernel": "aten::mm"}
    assert sync_sites(events) == [(0.26, "Optimizer.step > aten::item")]


def test_moe_smoke_times_fp8_experts_row():
    """--fp8 RECIPE --fp8-experts on the MoE shape: an emulated FP8 row with the experts in FP8
    too, named so, beside the bf16 row, and its speed-up computed against that row."""
    out = _run_smoke("--model", "qwen3-moe-small", "--hf-experts", "eager", "--fp8", "tensorwise",
                     "--fp8-experts")
    fp8 = [k for k in out["impls"] if ",fp8-tensorwise+experts]" in k]
    assert len(fp8) == 1 and out["fp8_speedup"] > 0
    assert abs(out["impls"][fp8[0]]["first_loss"] - math.log(256)) < 0.2
    assert not out["best"].endswith("+experts]")       # FP8 rows are not candidates for "best"
