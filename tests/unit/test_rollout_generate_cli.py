"""`r1mega generate` end to end on CPU: config + prompts JSONL -> completions JSONL, from a saved
model checkpoint; compared with the engine run directly on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

from r1mega.config import ModelConfig, RolloutConfig
from r1mega.rollout import generate_cli
from tests.conftest import free_port

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=96, vocab_size=128, max_position_embeddings=256)


def test_generate_cli_from_checkpoint(tmp_path, single_rank_runtime, monkeypatch):
    from r1mega.convert.mcore_io import save_model_state
    from r1mega.data.tokenizer import CharTokenizer
    from r1mega.models.gpt import build_model
    from r1mega.parallel.runtime import destroy_parallel
    from r1mega.rollout.engine import RolloutEngine
    from r1mega.rollout.types import GenerationRequest

    tok = CharTokenizer()
    prompts = ["What is 2+3?", "Say hi.", "<think>"]
    # A model whose weights are not the config's initial ones: only a real load reproduces it.
    rt = single_rank_runtime()
    model = build_model(ModelConfig(**MODEL), rt, wrap=False)
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = str(tmp_path / "ckpt")
    save_model_state(model, ckpt, ModelConfig(**MODEL))
    rcfg = RolloutConfig(max_new_tokens=12, group_size=2, seed=5, kv_block_tokens=8,
                         kv_cpu_tokens=1024, cuda_graphs=False, stop=["</answer>"])
    eng = RolloutEngine(model, rcfg, rt, eos_ids=[tok.eos_id], decode_fn=tok.decode, vocab_size=128)
    want = eng.generate([GenerationRequest(tok.encode(p), n=2, seed=5 + i) for i, p in enumerate(prompts)])
    destroy_parallel()

    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(json.dumps({  # JSON is YAML
        "model": MODEL, "data": {"tokenizer": "char"}, "checkpoint": {"load": ckpt},
        "rollout": {"max_new_tokens": 12, "group_size": 2, "seed": 5, "kv_block_tokens": 8,
                    "kv_cpu_tokens": 1024, "stop": ["</answer>"]},
    }))
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    rc = generate_cli.main([str(cfg_path), "--prompts", str(prompts_path), "--out", str(out),
                            "--no-progress", "rollout.cuda_graphs=false"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    for r, c in zip(rows, want):
        assert r["token_ids"] == c.token_ids and r["finish_reason"] == c.finish_reason
        assert r["num_tokens"] == len(c.token_ids) and r["completion"] == c.text
        assert r["logprobs"] == pytest.approx(c.logprobs, abs=1e-6)


def test_bad_prompt_row_names_file_and_line(tmp_path):
    from r1mega.data.tokenizer import CharTokenizer

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: bad prompt row"):
        generate_cli.read_prompt_rows(str(p), CharTokenizer())
    rows, skipped = generate_cli.read_prompt_rows(str(p), CharTokenizer(), on_bad_row="skip")
    assert len(rows) == 1 and skipped == 1
