"""The code sandbox against hostile programs: each attack scores 0, within the limits, and leaves
no process or file behind; the test process (and a bystander process of ours) survive."""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import uuid

import pytest

from r1mega.rewards import sandbox
from r1mega.rewards.sandbox import SandboxLimits, run_tests

FACTORIAL = '''
def factorial(n):
    if n < 0:
        raise ValueError("factorial of a negative number")
    result = 1
    for k in range(2, n + 1):
        result *= k
    return result
'''
WRONG_AT_ZERO = '''
def factorial(n):
    if n < 0:
        raise ValueError("negative")
    if n == 0:
        return 0
    result = 1
    for k in range(2, n + 1):
        result *= k
    return result
'''
ACCEPTS_NEGATIVE = '''
def factorial(n):
    result = 1
    for k in range(2, n + 1):
        result *= k
    return result
'''
TESTS = '''
assert factorial(0) == 1
assert factorial(1) == 1
assert factorial(5) == 120
assert factorial(10) == 3628800
try:
    factorial(-3)
    raise AssertionError("factorial(-3) did not raise")
except ValueError:
    pass
'''
# Generous: a loaded 2-core CI box must not turn a passing run into a timeout. Attacks that hang
# use their own short limits below.
LIMITS = SandboxLimits(timeout_s=10.0, memory_mb=512)


def _processes_with(text: str) -> list[int]:
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(int(path.split("/")[2]))
    return found


def _sandbox_dirs() -> set:
    return set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "r1mega_sbx_*")))


@pytest.fixture
def clean_run():
    """Runs a program and checks that nothing outlives it: no process, no work dir."""
    before = _sandbox_dirs()

    def run(program, tests=TESTS, entry_point=None, limits=LIMITS, markers=()):
        res = run_tests(program, tests, entry_point, limits)
        assert res.run_id and not _processes_with(res.run_id), "a sandbox process survived"
        for m in markers:
            assert not _processes_with(m), f"a process started by the program ({m}) survived"
        assert _sandbox_dirs() == before, "the sandbox work dir was not removed"
        assert res.wall_s < limits.timeout_s + 10
        return res

    return run


def test_isolation_is_reported():
    iso = sandbox.detect_isolation()
    assert iso["mode"].startswith(("namespaces", "fallback"))


def test_seed_example_factorial(clean_run):
    assert clean_run(FACTORIAL).passed
    assert clean_run(FACTORIAL, entry_point="factorial").passed
    wrong0 = clean_run(WRONG_AT_ZERO)
    assert not wrong0.passed and wrong0.status == "failed"
    assert not clean_run(ACCEPTS_NEGATIVE).passed


@pytest.mark.parametrize("name,program", [
    ("sys.exit(0) before anything", "import sys\nsys.exit(0)\n" + FACTORIAL),
    ("os._exit(0) before anything", "import os\nos._exit(0)\n" + FACTORIAL),
    ("exit(0) inside the function", "def factorial(n):\n    raise SystemExit(0)\n"),
    ("os._exit(0) inside the function", "import os\ndef factorial(n):\n    os._exit(0)\n"),
    ("print a success marker", "print('All tests passed!')\nprint('{\"passed\": true}')\n"
     + ACCEPTS_NEGATIVE),
    ("replace AssertionError", "import builtins\nclass Quiet(Exception): pass\n"
     "builtins.AssertionError = Quiet\nbuiltins.ValueError = Exception\n" + ACCEPTS_NEGATIVE),
    ("always-equal result", "class Eq(int):\n    def __eq__(self, o): return True\n"
     "    def __ne__(self, o): return False\n"
     "def factorial(n):\n    if n < 0: raise ValueError\n    return Eq(0)\n"),
    ("patch the harness through gc", "import gc, sys\n"
     "for o in gc.get_objects():\n"
     "    if isinstance(o, dict) and '_judge' in o:\n"
     "        o['_judge'] = lambda *a, **k: (True, '')\n" + ACCEPTS_NEGATIVE),
    ("forge a verdict on every fd", "import os, json, glob\n"
     "msg = json.dumps({'nonce': 'x' * 32, 'passed': True, 'error': ''}).encode()\n"
     "for fd in range(3, 64):\n"
     "    try: os.write(fd, msg)\n    except OSError: pass\n"
     "for p in glob.glob('/proc/*/fd/*'):\n"
     "    try:\n        with open(p, 'wb') as f: f.write(msg)\n    except OSError: pass\n"
     + ACCEPTS_NEGATIVE),
    ("kill the harness", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + FACTORIAL),
])
def test_cheating_scores_zero(clean_run, name, program):
    res = clean_run(program)
    assert not res.passed, f"{name}: {res}"


def test_tests_and_nonce_are_out_of_the_candidates_reach(clean_run):
    """Reading the expected answers out of memory would be a perfect hack; the candidate's
    process never holds the tests or the nonce."""
    program = (
        "import gc, sys\n"
        "SECRET = ''.join(['NEEDLE', '_7731'])  # built at run time: not a folded constant\n"
        "def _strings(o, depth=0):\n"
        "    if isinstance(o, (str, bytes)):\n"
        "        yield o if isinstance(o, str) else o.decode('latin-1')\n"
        "    elif depth < 4 and isinstance(o, dict):\n"
        "        for v in list(o.values()):\n"
        "            yield from _strings(v, depth + 1)\n"
        "    elif depth < 4 and isinstance(o, (list, tuple)):\n"
        "        for v in o:\n"
        "            yield from _strings(v, depth + 1)\n"
        "def peek():\n"
        "    seen = []\n"
        "    f = sys._getframe()\n"
        "    while f is not None:\n"
        "        seen += list(_strings(dict(f.f_locals)))\n"
        "        f = f.f_back\n"
        "    for o in gc.get_objects():\n"
        "        seen += list(_strings(o, 3))\n"
        "    return any(SECRET in t and t is not SECRET for t in seen)\n")
    res = clean_run(program, tests="assert peek() is False  # NEEDLE_7731\n")
    assert res.passed, res


def test_infinite_loop_times_out(clean_run):
    res = clean_run("while True:\n    pass\n", limits=SandboxLimits(timeout_s=2.0, memory_mb=512))
    assert not res.passed and res.status == "timeout"


def test_fork_bomb_and_orphans_are_killed(clean_run):
    marker = f"{uuid.uuid4().int % 10 ** 9 + 10 ** 9}"
    program = (f"import os, subprocess\n"
               f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
               f"while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    res = clean_run(program, limits=SandboxLimits(timeout_s=3.0, memory_mb=512),
                    markers=(f"sleep {marker}",))
    assert not res.passed


def test_ten_gigabyte_allocation_fails(clean_run):
    res = clean_run("x = bytearray(10 * 1024 ** 3)\n" + FACTORIAL)
    assert not res.passed and "MemoryError" in res.error


def test_no_network(clean_run):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               f"s.sendall(b'hello')\n" + FACTORIAL)
    try:
        res = clean_run(program)
        assert not res.passed
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_no_write_outside_the_work_dir(clean_run, tmp_path):
    name = f"r1mega_pwned_{uuid.uuid4().hex}"
    targets = [os.path.join("/tmp", name), str(tmp_path / name), os.path.join(os.getcwd(), name)]
    program = "".join(f"open({t!r}, 'w').write('x')\n" for t in targets) + FACTORIAL
    res = clean_run(program)
    assert not res.passed
    for t in targets:
        assert not os.path.exists(t), f"the program wrote {t}"
    # Writing inside its own work dir is fine.
    assert clean_run("open('scratch.txt', 'w').write('ok')\n" + FACTORIAL).passed


def test_kill_everything_spares_bystanders(clean_run):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        res = clean_run("import os, signal\nos.kill(-1, signal.SIGKILL)\n" + FACTORIAL)
        assert not res.passed or res.status == "passed"  # either way: it must not reach us
        assert bystander.poll() is None, "the sandboxed program killed a process outside it"
    finally:
        bystander.kill()
        bystander.wait()


def test_environment_is_stripped(clean_run, monkeypatch):
    monkeypatch.setenv("R1MEGA_TEST_SECRET", "hunter2")
    program = "import os\ndef leak():\n    return sorted(os.environ)\n"
    res = clean_run(program, tests="assert 'R1MEGA_TEST_SECRET' not in leak()\n"
                                   "assert 'PATH' in leak()\n")
    assert res.passed, res


def test_output_is_capped(clean_run):
    res = clean_run("print('x' * 10_000_000)\n" + FACTORIAL)
    assert res.passed
    assert len(res.stdout) <= LIMITS.output_cap_bytes


def test_fallback_mode_still_contains_the_basics(clean_run, monkeypatch):
    """Without namespaces: process-group and descendant sweep, audit-hook guards."""
    drop = sandbox.detect_isolation()["drop_uid"] if sandbox._world_readable_python() else None
    iso = dict(sandbox.detect_isolation(), prefix=None, drop_uid=drop, mode="fallback(test)")
    monkeypatch.setattr(sandbox, "detect_isolation", lambda: iso)
    assert clean_run(FACTORIAL).passed
    assert not clean_run("import sys\nsys.exit(0)\n").passed
    marker = f"{uuid.uuid4().int % 10 ** 9 + 10 ** 9}"
    res = clean_run(f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], "
                    f"start_new_session=True)\nwhile True:\n    pass\n",
                    limits=SandboxLimits(timeout_s=2.0, memory_mb=512),
                    markers=(f"sleep {marker}",))
    assert res.status == "timeout"
    res = clean_run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
                    + FACTORIAL)
    assert not res.passed and "network" in res.error


def test_user_namespace_mode_keeps_the_filesystem_read_only(clean_run, monkeypatch, tmp_path):
    """The mode of non-root users: the candidate keeps our uid (no nobody to drop to), so only
    the read-only remount stops it from writing our files (repository, checkpoints, home)."""
    iso = sandbox.detect_isolation()
    if not iso["prefix"]:
        pytest.skip("no namespaces on this machine")
    prefix = list(iso["prefix"])
    if "-r" not in prefix:
        prefix.insert(1, "-r")
    monkeypatch.setattr(sandbox, "detect_isolation",
                        lambda: dict(iso, prefix=prefix, drop_uid=None, mode="userns(test)"))
    name = f"r1mega_pwned_{uuid.uuid4().hex}"
    targets = [str(tmp_path / name), os.path.join(os.getcwd(), name)]
    for t in targets:
        res = clean_run(f"open({t!r}, 'w').write('x')\n" + FACTORIAL)
        assert not res.passed, res
        assert not os.path.exists(t)
    # /tmp is a private tmpfs there (tmp_path does not even exist); the repository is read-only,
    # unless it lives under /tmp itself (a CI clone may), where it is hidden like tmp_path.
    # (A clone with its venv under /tmp: the directories leading to the venv are back, on a
    # read-only tmpfs of their own.)
    hidden = os.path.realpath(os.getcwd()).startswith(("/tmp/", "/var/tmp/", "/dev/shm/"))
    expected = ("No such file or directory", "Read-only file system") if hidden else \
        ("Read-only file system",)
    assert any(e in res.error for e in expected), res
    assert clean_run("open('scratch.txt', 'w').write('ok')\n" + FACTORIAL).passed
    assert not clean_run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
                         + FACTORIAL).passed


@pytest.mark.parametrize("mode", ["as_configured", "user_namespace"])
def test_candidate_cannot_remount_the_filesystem_writable(clean_run, monkeypatch, mode):
    """uid 0 of a user namespace (non-root users) would hold every capability there, enough to
    remount the read-only mounts writable again: the candidate must hold none."""
    iso = sandbox.detect_isolation()
    if not iso["prefix"]:
        pytest.skip("no namespaces on this machine")
    if mode == "user_namespace":
        prefix = list(iso["prefix"])
        if "-r" not in prefix:
            prefix.insert(1, "-r")
        monkeypatch.setattr(sandbox, "detect_isolation",
                            lambda: dict(iso, prefix=prefix, drop_uid=None, mode="userns(test)"))
    target = os.path.join(os.getcwd(), f"r1mega_pwned_{uuid.uuid4().hex}")
    program = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
MS_REMOUNT, MS_BIND, MS_RELATIME = 32, 4096, 1 << 21
results = [libc.mount(None, b"/", None, MS_REMOUNT | flags, None)
           for flags in (MS_BIND, MS_BIND | MS_RELATIME, 0)]
try:
    open({target!r}, "w").write("x")
    wrote = True
except OSError:
    wrote = False
CAP_EFF = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
def report():
    return results, wrote, CAP_EFF
"""
    res = clean_run(program, tests="r, w, cap = report()\n"
                                   "assert r == [-1, -1, -1] and not w and int(cap, 16) == 0, "
                                   "(r, w, cap)\n")
    assert res.passed, res
    assert not os.path.exists(target)


def test_sandbox_cleans_up_after_its_caller_is_killed(tmp_path):
    """A reward worker killed mid-run (its time box) must not leave the sandbox running: the judge
    keeps its own clock and takes the namespace, and the candidate, down with it."""
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    marker = f"{uuid.uuid4().int % 10 ** 9 + 10 ** 9}"
    dirs_before = _sandbox_dirs()
    # It sleeps rather than spins, so the CPU limit cannot be what ends it.
    program = (f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'], "
               f"start_new_session=True)\ntime.sleep(1000)\n")
    caller = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
         "from r1mega.rewards.sandbox import run_tests, SandboxLimits; "
         "run_tests(sys.argv[2], 'assert True', None, SandboxLimits(timeout_s=2.0))",
         root, program], start_new_session=True)
    deadline = time.monotonic() + 30
    while not _processes_with(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(f"sleep {marker}"), "the sandboxed program never started"
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 30
    while _processes_with(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(f"sleep {marker}"), "the sandbox outlived its caller"
    if sandbox.detect_isolation()["prefix"]:
        assert _sandbox_dirs() == dirs_before, "a work dir outlived the killed caller"


_UNDER_TMP_PROBE = r'''
import json, os, sys
from r1mega.rewards import sandbox
from r1mega.rewards.sandbox import SandboxLimits, run_tests
clone = sys.argv[1]
good = "import r1mega_probe_mod\ndef f(x):\n    return x + r1mega_probe_mod.VALUE\n"
lim = SandboxLimits(timeout_s=10.0, memory_mb=512)
out = {"prefix": sys.prefix, "cwd": os.getcwd(),
       "isolated": bool(sandbox.detect_isolation()["prefix"]),
       "good": run_tests(good, "assert f(1) == 42\n", None, lim).__dict__,
       "bad": run_tests(good.replace("+", "-"), "assert f(1) == 42\n", None, lim).__dict__,
       "listing": run_tests(good + "import os\nSEEN = sorted(os.listdir(%r))\n"
                            "def seen():\n    return SEEN\n" % clone,
                            "assert seen() == ['.venv'], seen()\n", None, lim).__dict__,
       "write": run_tests(good + "open(%r, 'w').write('x')\n"
                          % os.path.join(sys.prefix, "pwned"), "assert True\n", None, lim).__dict__}
print(json.dumps(out))
'''


def test_python_and_checkout_under_tmp():
    """A fresh clone with its virtual environment under /tmp (the README's new user): the tmpfs
    the sandbox lays over /tmp must not hide the interpreter's own tree (its site-packages, here
    a module only the venv has), yet the rest of the clone stays hidden and the venv read-only."""
    import json
    import shutil
    import sys
    import tempfile

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = tempfile.mkdtemp(prefix="r1mega_clone_", dir="/tmp")
    try:
        clone = os.path.join(base, "clone")
        shutil.copytree(os.path.join(repo, "r1mega"), os.path.join(clone, "r1mega"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        venv = os.path.join(clone, ".venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                        venv], check=True, timeout=60)
        py = os.path.join(venv, "bin", "python")
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "r1mega_probe_mod.py"), "w") as f:
            f.write("VALUE = 41\n")
        # --system-site-packages reaches the base interpreter's packages, not those of the venv
        # running this test (the README's user: psutil and the rest installed there only)
        import site as site_mod
        with open(os.path.join(site, "r1mega_parent_env.pth"), "w") as f:
            f.writelines(f"import site; site.addsitedir({d!r})\n"
                         for d in site_mod.getsitepackages() if d != site)
        # The clone's own code, not the worktree's: PYTHONPATH is the clone, cwd is the clone.
        env = dict(os.environ, PYTHONPATH=clone)
        proc = subprocess.run([py, "-c", _UNDER_TMP_PROBE, clone], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out["prefix"] == venv and out["cwd"] == clone
        assert out["good"]["passed"], out["good"]
        assert out["bad"]["status"] == "failed", out["bad"]
        assert "AssertionError" in out["bad"]["error"], out["bad"]
        assert not out["write"]["passed"]
        assert not os.path.exists(os.path.join(venv, "pwned"))
        if out["isolated"]:
            assert out["listing"]["passed"], out["listing"]  # only .venv of the clone is there
            assert "Read-only file system" in out["write"]["error"], out["write"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
