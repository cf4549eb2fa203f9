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
