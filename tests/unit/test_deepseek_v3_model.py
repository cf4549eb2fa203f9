"""The deepseek_v3 family as a training model: config checks name the key, the tiny CPU config
trains with `r1mega sft` (MLA, YaRN, MoE, MTP together), packed sequences equal separate ones,
and the model (MTP modules included) survives a checkpoint round trip."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from r1mega.config import Config, ConfigError, ModelConfig, PrecisionConfig, load_config, validate
from r1mega.models.attention import make_packed_seqs
from r1mega.models.deepseek_v3.hf_peer import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "deepseek_v3_tiny_cpu.yaml")
# TINY with every MoE key at its dense default (MoE layers refuse TP > 1 and model.spec=te first).
DENSE = dict(num_experts=0, moe_router="softmax", moe_router_topk=2, moe_ffn_hidden_size=0,
             moe_shared_expert_ffn_hidden_size=0, moe_num_groups=1, moe_topk_groups=1,
             moe_routed_scaling_factor=1.0, moe_first_k_dense=0)


def _cfg(**model) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(ModelConfig(**TINY), **{"spec": "local", **model})
    return cfg


@pytest.mark.parametrize("change,needle", [
    (dict(DENSE, family="llama"), "model.mla.q_lora_rank has no effect"),
    (dict(num_query_groups=2), "must equal model.num_attention_heads"),
    (dict(qk_norm=True), "do not apply to deepseek_v3"),
    (dict(DENSE, spec="te"), "model.spec=te has no MLA layer"),
    (dict(mla=dict(TINY["mla"], qk_rope_head_dim=7)), "qk_rope_head_dim must be even"),
    (dict(rope_scaling=dict(TINY["rope_scaling"], mscale=0.5)), "equal, nonzero mscale"),
    (dict(rope_scaling=dict(type="llama3")), "DeepSeek-V3 uses 'yarn'"),
])
def test_bad_deepseek_configs_are_refused_by_key(change, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(_cfg(**change))


def test_latent_widths_must_split_over_tp():
    cfg = _cfg(**DENSE, mla=dict(TINY["mla"], kv_lora_rank=33))
    cfg.parallel.tensor = 2
    with pytest.raises(ConfigError, match=r"kv_lora_rank \+ qk_rope_head_dim=41 is not divisible"):
        validate(cfg, world_size=2)


def test_tiny_config_validates_and_names_v3_structure():
    cfg = load_config(CONFIG)
    validate(cfg, world_size=1)
    m = cfg.model
    assert (m.family, m.moe_first_k_dense, m.moe_router, m.mtp_num_layers) == ("deepseek_v3", 1, "sigmoid_group", 1)
    assert m.moe_shared_expert_ffn_hidden_size > 0 and m.mla.q_lora_rank > 0 and m.rope_scaling.type == "yarn"


def test_packed_sequences_equal_separate_ones(rt_fp32):
    from r1mega.models.gpt import build_model

    torch.manual_seed(0)
    gpt = build_model(_cfg().model, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)[0]
    gpt.eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 9, 3)]
    with torch.no_grad():
        packed = gpt(torch.cat(seqs).view(1, -1), None, attention_mask=None,
                     packed_seq_params=make_packed_seqs([5, 9, 3], "cpu"))[0]
        alone = torch.cat([gpt(s.view(1, -1), None, attention_mask=None)[0] for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_keeps_mtp_and_router_bias(rt_fp32, tmp_path):
    from r1mega.convert import mcore_io
    from r1mega.models.gpt import build_model

    m = _cfg(mtp_num_layers=1, moe_bias_update_rate=0.001).model
    torch.manual_seed(0)
    a = build_model(m, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)
    with torch.no_grad():
        a[0].decoder.layers[2].mlp.expert_bias.normal_()
    mcore_io.save_model_state(a, str(tmp_path / "ckpt"), m)
    torch.manual_seed(1)
    b = build_model(m, rt_fp32, PrecisionConfig(dtype="fp32"), wrap=False)
    mcore_io.load_model_state(b, str(tmp_path / "ckpt"))
    sa, sb = a[0].state_dict(), b[0].state_dict()
    assert any(k.startswith("mtp_heads.") for k in sa) and "decoder.layers.2.mlp.expert_bias" in sa
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sb[k]), k


def test_sft_smoke_on_cpu(tmp_path):
    """`r1mega sft configs/deepseek_v3_tiny_cpu.yaml` end to end; the loss goes down."""
    from r1mega.convert.testing import free_port

    env = dict(os.environ, PYTHONPATH=ROOT, MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-m", "r1mega.cli", "sft", CONFIG, "train.steps=5",
                          "optimizer.warmup_steps=0", "optimizer.decay_style=constant",
                          f"logging.run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(line.split("loss=")[1].split()[0]) for line in out.stdout.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 5 and losses[-1] < losses[0], out.stdout


@pytest.mark.parametrize("name,world", [("deepseek_v3_small_gpu.yaml", 1), ("deepseek_v3_671b.yaml", 64)])
def test_gpu_and_paper_scale_configs_validate(name, world):
    from r1mega.models.gpt import count_parameters

    cfg = load_config(os.path.join(ROOT, "configs", name))
    validate(cfg, world_size=world)
    if name == "deepseek_v3_671b.yaml":
        # 37B activated parameters per token (DeepSeek-V3 report), MTP module not counted.
        assert 36.5e9 < count_parameters(cfg.model) < 38e9


def test_flash_style_backends_get_values_padded_to_the_query_width(monkeypatch):
    """MLA's v (128) is narrower than q/k (192): the varlen/flash paths, which take one head size,
    see v zero-padded and return the v-wide output, equal to SDPA's (which takes both widths)."""
    from r1mega.models import attention as A

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=None, **kw):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]  # what the flash kernels demand
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        return A.sdpa_packed(q, k, v, lengths, scale)

    monkeypatch.setattr(A, "_torch_varlen", fake_varlen)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(10, 4, 24, generator=g), torch.randn(10, 4, 24, generator=g), torch.randn(10, 4, 16, generator=g)
    params = make_packed_seqs([3, 7], "cpu")
    got = A.varlen_packed(q, k, v, params.cu_seqlens_q, 7, 0.2)
    assert got.shape == (10, 4, 16)
    torch.testing.assert_close(got, A.sdpa_packed(q, k, v, [3, 7], 0.2))


@pytest.mark.slow  # a GRPO step's rollout on CPU (~15 s) plus start-up
def test_grpo_smoke_on_cpu(tmp_path):
    """`r1mega train` (GRPO: rollout on the latent cache, rewards, log-probs without MTP, update)
    runs end to end on the tiny DeepSeek-V3."""
    from r1mega.convert.testing import free_port

    env = dict(os.environ, PYTHONPATH=ROOT, MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-m", "r1mega.cli", "train", CONFIG, "train.mode=grpo",
                          "train.steps=2", "rollout.max_new_tokens=12", "rollout.group_size=4",
                          "data.global_batch_prompts=4", "rewards.num_workers=0",
                          f"logging.run_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("reward=" in s for s in steps), out.stdout
