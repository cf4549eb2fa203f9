"""Every user-facing bad input is one line on stderr, exit code 2, no traceback (the `r1mega`
program as a user runs it, in a subprocess); R1MEGA_DEBUG=1 brings the traceback back."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
# A tiny GRPO run: the error must come before any real work.
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=2", "model.num_query_groups=1", "train.sft_steps=0",
        "data.eval_source=null", "data.global_batch_prompts=4", "rollout.group_size=2",
        "rollout.max_new_tokens=4", "train.steps=1"]


def run_cli(args, tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(PYTHONPATH=ROOT, **env_extra)
    if "R1MEGA_DEBUG" not in env_extra:
        env.pop("R1MEGA_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "r1mega.cli", *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(result, *fragments):
    rc, out, err = result
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    assert "Traceback" not in err + out, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("r1mega "), lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _train(tmp_path, *extra):
    return run_cli(["train", DEMO, *TINY, f"logging.run_dir={tmp_path / 'run'}", *extra], tmp_path)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_config_error_is_the_standard(tmp_path):
    assert_one_line_error(run_cli(["train", DEMO, "optimizer.lrr=1e-6"], tmp_path),
                          "config error", "optimizer.lrr", "optimizer.lr")


def test_missing_data_source(tmp_path):
    assert_one_line_error(_train(tmp_path, f"data.source={tmp_path / 'nope.jsonl'}"),
                          "data.source=", "nope.jsonl", "does not exist")


def test_malformed_jsonl_row(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, "{not json"])
    assert_one_line_error(_train(tmp_path, f"data.source={src}"),
                          "d.jsonl:2", "not valid JSON", "data.on_bad_row=skip")


def test_row_missing_its_reference(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "kind": "math"}])
    assert_one_line_error(_train(tmp_path, f"data.source={src}"),
                          "d.jsonl:1", "kind 'math' needs ['answer']")


def test_missing_tokenizer(tmp_path):
    assert_one_line_error(_train(tmp_path, f"data.tokenizer={tmp_path / 'tok.json'}"),
                          "data.tokenizer=", "tok.json", "does not exist")


def test_missing_hf_dir(tmp_path):
    line = assert_one_line_error(_train(tmp_path, f"model.init_from_hf={tmp_path / 'hf'}"),
                                 "model.init_from_hf=", "config.json does not exist")
    assert "--hf" not in line  # the flag of `r1mega convert`, not a key of this command


def test_no_valid_checkpoint_to_load(tmp_path):
    (tmp_path / "ckpts").mkdir()
    assert_one_line_error(_train(tmp_path, f"checkpoint.load={tmp_path / 'ckpts'}"),
                          "checkpoint.load=", "no valid checkpoint")


def test_generate_missing_prompt_file(tmp_path):
    assert_one_line_error(run_cli(["generate", DEMO, "--prompts", "p.jsonl", "--out", "o.jsonl"],
                                  tmp_path), "--prompts p.jsonl does not exist")


def test_generate_bad_prompt_row(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}, {"text": "no prompt key"}])
    assert_one_line_error(run_cli(["generate", DEMO, "--prompts", "p.jsonl", "--out", "o.jsonl"],
                                  tmp_path), "p.jsonl:2", "bad prompt row", "'prompt'")


def test_generate_checkpoint_without_model(tmp_path):
    _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1="}])
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli(["generate", DEMO, "--prompts", "p.jsonl", "--out", "o.jsonl",
                                   *TINY, f"checkpoint.load={tmp_path / 'empty'}"], tmp_path),
                          "checkpoint.load=", "no model/ directory")
    assert not (tmp_path / "o.jsonl").exists()


def test_reward_missing_input(tmp_path):
    assert_one_line_error(run_cli(["reward", "--input", "nope.jsonl"], tmp_path),
                          "--input nope.jsonl")


def test_launch_environment(tmp_path):
    assert_one_line_error(run_cli(["train", DEMO], tmp_path, RANK="0", WORLD_SIZE="two"),
                          "WORLD_SIZE='two' is not an integer")


def test_convert_missing_hf_dir(tmp_path):
    assert_one_line_error(run_cli(["convert", "hf-to-mcore", "--hf", "nohf", "--out", "o"], tmp_path),
                          "--hf=nohf", "config.json does not exist")


def test_debug_env_shows_the_traceback(tmp_path):
    rc, _, err = run_cli(["train", DEMO, "optimizer.lrr=1"], tmp_path, R1MEGA_DEBUG="1")
    assert rc != 0 and "Traceback" in err and "optimizer.lrr" in err
