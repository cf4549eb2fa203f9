"""Conversion under TP=2 and PP=2 (2 gloo ranks): HF -> sharded model -> HF is bit-identical,
TP-gathered logits match transformers, and a checkpoint written under one layout loads onto the
others (TP=2 -> PP=2 -> TP=1; the padded vocabulary differs between them)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from tests.distributed.harness import run_ranks  # noqa: E402

# Qwen2 untied bf16 (q/k/v biases, an output layer of its own) and Llama tied fp32 (the last PP
# stage holds a copy of the embedding). Vocab 131 pads to 192 at TP=1 and 256 at TP=2.
MODELS = {
    "qwen2": dict(family="qwen2", tied=False, dtype=torch.bfloat16, num_layers=4, vocab_size=131),
    "llama": dict(family="llama", tied=True, dtype=torch.float32, num_layers=4, vocab_size=131),
}


def _worker(rank, world_size, tp, pp, hf_dirs, work, sources):
    # sources: None = the HF dirs, or the layout tag of a checkpoint written by an earlier run.
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.runtime import init_parallel

    rt = init_parallel(ParallelConfig(tensor=tp, pipeline=pp), PrecisionConfig(dtype="fp32"))
    return {src: _convert(rt, hf_dirs, work, src) for src in sources}


def _convert(rt, hf_dirs, work, load_from):
    import dataclasses

    from r1mega.convert import mcore_io
    from r1mega.convert.families import ConversionError
    from r1mega.convert.hf_bridge import export_hf, load_hf_into_model
    from r1mega.convert.hf_config import model_config_from_hf
    from r1mega.convert.hf_io import HFCheckpoint
    from r1mega.convert.verify import verify_against_hf
    from r1mega.models.gpt import build_model

    tp, pp = rt.tp_size, rt.pp_size
    tag = f"tp{tp}pp{pp}"
    out = {}
    for name, hf_dir in hf_dirs.items():
        ckpt = HFCheckpoint(hf_dir)
        cfg = dataclasses.replace(model_config_from_hf(ckpt.config), spec="local")
        dtype = ckpt.dtype()
        chunks = build_model(cfg, rt, wrap=False)
        if load_from:  # a checkpoint written under another layout
            mcore_io.load_model_state(chunks, os.path.join(work, f"mcore_{name}_{load_from}"))
        else:
            load_hf_into_model(chunks, ckpt, cfg, rt)
            mcore_io.save_model_state(chunks, os.path.join(work, f"mcore_{name}_{tag}"), cfg)
        if pp == 1:
            out[name] = verify_against_hf(chunks, hf_dir, cfg, rt).max_abs_diff
        export_hf(chunks, cfg, rt, os.path.join(work, f"hf_{name}_{tag}_from_{load_from or 'hf'}"),
                  dtype=dtype, original_config=ckpt.config)
    if tp == 2:
        # One KV group cannot be split over two TP ranks: refused by name before any copy.
        cfg = dataclasses.replace(model_config_from_hf(HFCheckpoint(hf_dirs["llama"]).config),
                                  spec="local")
        chunks = build_model(cfg, rt, wrap=False)
        try:
            load_hf_into_model(chunks, hf_dirs["llama"], dataclasses.replace(cfg, num_query_groups=1), rt)
            out["kv1"] = "accepted"
        except ConversionError as exc:
            out["kv1"] = str(exc)
    return out


def _assert_same_tensors(src: str, dst: str) -> None:
    from r1mega.convert.testing import load_safetensors_dir

    a, b = load_safetensors_dir(src), load_safetensors_dir(dst)
    assert set(a) == set(b), set(a) ^ set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), f"{dst}: {n} differs"


@pytest.mark.slow  # three 2-rank start-ups (megatron + transformers imports dominate)
def test_convert_tp2_pp2_and_relayout_bit_identical(tmp_path):
    from r1mega.convert.testing import make_tiny_hf_dir

    hf_dirs = {n: make_tiny_hf_dir(str(tmp_path / f"src_{n}"), **kw) for n, kw in MODELS.items()}
    work = str(tmp_path)

    tp2 = [r[None] for r in run_ranks(_worker, 2, args=(2, 1, hf_dirs, work, [None]))]
    for name in MODELS:
        assert all(r[name] < 1e-4 for r in tp2), tp2  # TP-gathered logits == transformers
        _assert_same_tensors(hf_dirs[name], os.path.join(work, f"hf_{name}_tp2pp1_from_hf"))
    assert "1 KV groups" in tp2[0]["kv1"] and "tensor parallel size 2" in tp2[0]["kv1"]

    # PP=2 from HF directly, and from the TP=2 checkpoint (re-layout + vocab re-padding 256 -> 192)
    run_ranks(_worker, 2, args=(1, 2, hf_dirs, work, [None, "tp2pp1"]))
    for name in MODELS:
        _assert_same_tensors(hf_dirs[name], os.path.join(work, f"hf_{name}_tp1pp2_from_hf"))
        _assert_same_tensors(hf_dirs[name], os.path.join(work, f"hf_{name}_tp1pp2_from_tp2pp1"))

    # TP=1 (one rank) from the PP=2 checkpoint, with logits checked again
    one = run_ranks(_worker, 1, args=(1, 1, hf_dirs, work, ["tp1pp2"]))
    for name in MODELS:
        assert one[0]["tp1pp2"][name] < 1e-4
        _assert_same_tensors(hf_dirs[name], os.path.join(work, f"hf_{name}_tp1pp1_from_tp1pp2"))
    assert not [p for p in os.listdir(work) if p.endswith(".partial")]
