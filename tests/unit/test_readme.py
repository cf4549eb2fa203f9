"""The README's quick start is the contract with users and CI: keep them in step."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quick_start_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_exactly_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each quick-start command is one line"
    assert "r1mega demo" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_setup_never_depends_on_pypi_apex():
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert not re.search(r"['\"]apex['\"]", setup)


# ----------------------------------------------------------------------------- README snippets
# The README's cheap CPU snippets, run as written, so that they cannot drift from the code.

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


def _section(title: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _as_subprocess(line: str) -> str:
    """A README shell line with this checkout's Python (no reliance on what is on PATH)."""
    line = re.sub(r"^r1mega ", f"{sys.executable} -m r1mega.cli ", line)
    return re.sub(r"^python ", f"{sys.executable} ", line)


def _env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, **extra)


def test_reward_examples_score_every_default_reward(tmp_path):
    from r1mega.rewards.scorer import DEFAULT_SPECS

    section = _section("Rewards")
    lines = re.findall(r"^```jsonl\n(.*?)^```$", section, flags=re.S | re.M)[0].strip().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert sorted(kinds) == sorted(DEFAULT_SPECS), "one example line per default kind"
    table_kinds = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert sorted(table_kinds) == sorted(DEFAULT_SPECS), "one table row per default kind"
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(_as_subprocess("r1mega reward --input in.jsonl").split(), cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(results) == len(lines)
    for kind, res in zip(kinds, results):
        full = sum(DEFAULT_SPECS[kind].values())  # every reward of the kind at its full weight
        assert res["error"] is None and res["score"] == pytest.approx(full), (kind, res)


def test_reward_table_names_the_fields_the_loader_requires():
    from r1mega.data.datasets import REQUIRED_FIELDS

    rows = {m.group(1): m.group(0) for m in
            re.finditer(r"^\| `(\w+)` \|.*$", _section("Rewards"), flags=re.M)}
    for kind, fields in REQUIRED_FIELDS.items():
        for f in fields:
            assert f"`{f}`" in rows[kind].rsplit("|", 2)[-2], (kind, f)


def test_override_example_loads():
    from r1mega.config import load_config

    text = open(os.path.join(ROOT, "README.md")).read()
    example = re.search(r"Overrides are dotted keys into the typed config tree \(`r1mega/config.py`\): "
                        r"`([^`]*)`", text.replace("\n", " ")).group(1)
    cfg = load_config(None, example.split())
    assert (cfg.parallel.tensor, cfg.optimizer.lr, cfg.rollout.group_size) == (2, 1e-6, 16)


@pytest.mark.slow
def test_smollm2_cpu_snippet_generates_what_transformers_generates(tmp_path, smollm2_gguf):
    """The README's CPU block as written, except `rollout.max_new_tokens=8` appended to the
    generate line (2 shared cores); greedy tokens equal transformers' fp32 greedy `generate()`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    block = re.findall(r"```bash\n(.*?)```", _section("SmolLM2-135M-Instruct, on CPU and GPU"),
                       flags=re.S)[0]
    env = _env(R1MEGA_CACHE=os.path.dirname(smollm2_gguf))
    for line in block.strip().splitlines():
        if line.startswith("r1mega generate"):
            line += f" --no-progress rollout.max_new_tokens=8"
        line = line.replace("configs/", os.path.join(ROOT, "configs") + "/")
        proc = subprocess.run(_as_subprocess(line), shell=True, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (line, proc.stderr[-3000:])
    out = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    hf = tmp_path / "runs" / "smollm2-hf-fp32"
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = json.loads((tmp_path / "prompts.jsonl").read_text())["messages"]
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out["token_ids"] == ref and out["num_tokens"] == 8, (out["completion"], tok.decode(ref))
