"""Run untrusted Python against unit tests: separate processes, limits, no network, no leftovers.

Layers, strongest first (chosen at run time by :func:`detect_isolation`):

* **Namespaces** (``unshare -m -p -f --kill-child --mount-proc -n``, with ``-r`` when not root):
  a new network namespace (only a downed loopback: every connection fails), a new PID namespace
  whose init is the judge (when it dies the kernel kills every process the completion started,
  even those that left our process group), and a private mount namespace where the judge lays a
  fresh 64 MB tmpfs over ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (the work dir lives there and
  vanishes with the namespace) and remounts every other mount read-only, so even a candidate
  that keeps our uid (non-root users, ``-r``) cannot touch the repository, checkpoints or home.
  An interpreter tree under one of those places (a venv or a clone under ``/tmp``) is held open
  before the tmpfs goes down and bound back, read-only, at its own path; the rest of the
  directory around it stays hidden.
* **Another user**: run as root, the candidate drops to ``nobody`` (so it cannot signal or ptrace
  the judge, and ``RLIMIT_NPROC`` stops a fork bomb). A Python under a private home (pyenv in
  ``/root``) is bound into reach; the rest of that home stays hidden. Without root, a fork bomb
  is bounded by the CPU/wall limits and the PID namespace teardown only (no NPROC per uid).
* **Fallback** (no ``unshare`` or the kernel refuses namespaces; reported in
  :func:`detect_isolation` and in every result's ``isolation``): a new session that we kill as a
  group, a sweep of every descendant, a fresh temp dir as cwd, and Python audit hooks that refuse
  sockets and writes outside the work dir. Audit hooks are not a security boundary (ctypes can
  get around them), so production clusters should run where user namespaces are allowed.

Known limits: files readable by everyone stay readable (a dataset on disk with the tests could
be found); tests see the completion's functions through proxies that pass plain data, so a test
that relies on in-place mutation of an argument, or passes a lambda, does not work here.

Always: ``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps, a wall
clock, an environment without the parent's variables (no tokens or keys leak in), a cap on the
output kept, and a verdict that only counts when it carries the nonce and arrives on the result
pipe (see ``_sandbox_harness.py`` for why the completion cannot forge it).
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
_NOBODY_UID = 65534


@dataclass
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 1024
    fsize_mb: int = 16
    nproc: int = 64
    output_cap_bytes: int = 16384


@dataclass
class SandboxResult:
    passed: bool
    # "passed" | "failed" | "timeout" | "crashed" | "error"
    status: str
    error: str = ""
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    isolation: str = ""
    # Appears in the command line of every sandbox process (tests look for leftovers by it).
    run_id: str = ""


def _world_readable_python() -> bool:
    for path in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}:
        cur = path
        while cur not in ("/", ""):
            if not os.stat(cur).st_mode & 0o001:
                return False
            cur = os.path.dirname(cur)
    return True


@functools.lru_cache(maxsize=1)
def detect_isolation() -> dict:
    """Which layers this machine allows; checked once per process by trying them."""
    unshare = shutil.which("unshare")
    base = ["-m", "-p", "-f", "--kill-child", "--mount-proc", "-n"]
    prefix = None
    if unshare:
        for extra in ([], ["-r"]) if os.geteuid() == 0 else (["-r"],):
            cmd = [unshare, *extra, *base]
            try:
                ok = subprocess.run(cmd + ["true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                prefix = cmd
                break
    # Without a mount namespace the judge cannot bind Python into reach of ``nobody``; if the
    # interpreter lives in a private directory (pyenv under /root), the candidate keeps our uid.
    drop_uid = _NOBODY_UID if os.geteuid() == 0 and (prefix or _world_readable_python()) else None
    if prefix:
        mode = "namespaces(net,pid,mount)" + ("+nobody" if drop_uid is not None else "")
    else:
        mode = "fallback(session,audit-hooks)" + ("+nobody" if drop_uid is not None else "")
    return {"prefix": prefix, "drop_uid": drop_uid, "mode": mode}


def _clean_env(work_dir: str) -> dict:
    # Nothing of the parent's environment: API keys, tokens and cluster credentials stay out.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": work_dir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the judge, every descendant and the group, and return only once they are gone."""
    try:
        root = psutil.Process(proc.pid)
        seen = {c.pid: c for c in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        root, seen = None, {}
    # Namespaced runs: the judge is unshare's child and the PID namespace's init. Killing it
    # makes the kernel kill everything in the namespace; unshare reaps it only after that, so
    # unshare's exit below means the whole namespace is empty.
    for _ in range(5):
        for k in seen.values():  # stop first so a fork bomb cannot outrun the kills
            try:
                k.send_signal(signal.SIGSTOP)
            except psutil.Error:
                pass
        for k in seen.values():
            try:
                k.kill()
            except psutil.Error:
                pass
        try:
            fresh = {c.pid: c for c in root.children(recursive=True)} if root else {}
        except psutil.NoSuchProcess:
            fresh = {}
        new = {pid: c for pid, c in fresh.items() if pid not in seen or not _gone(c)}
        if not new:
            break
        seen.update(new)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()
    # A child the judge forked is orphaned (re-parented to init, out of `seen`) when the judge
    # exits first; it is still in the judge's process group, so the group being empty is the end.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_group_alive(proc.pid)
                                           or not all(_gone(k) for k in seen.values())):
        time.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is still in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, OSError):
            continue
    return False


def run_tests(program: str, tests: str, entry_point: str | None = None,
              limits: SandboxLimits | None = None, stdio: list | None = None) -> SandboxResult:
    """Execute ``program``, then ``tests`` against it (HumanEval style: ``check(candidate)`` when
    ``entry_point`` is given, else module-level asserts naming the program's functions). With
    ``stdio`` (``[{"input": ..., "output": ...}]``) the program instead runs once per case as a
    script on that standard input, and must print the expected output (trailing whitespace
    aside); ``tests`` is then unused.

    Never raises for anything the program does; ``passed`` is True only with a genuine verdict.
    """
    lim = limits or SandboxLimits()
    iso = detect_isolation()
    # Namespaced runs work in the judge's private tmpfs (/tmp/work there): nothing on the host
    # to clean up, even if we are killed mid-run. Only the fallback needs a host directory.
    host_dir = None if iso["prefix"] else tempfile.mkdtemp(prefix="r1mega_sbx_")
    work_dir = host_dir or "/tmp/work"
    token = secrets.token_hex(8)
    nonce = secrets.token_hex(16)
    payload = {
        "program": program,
        "stdio": stdio is not None,
        "isolated": bool(iso["prefix"]),
        "netns": bool(iso["prefix"]),
        "drop_uid": iso["drop_uid"],
        "limits": {"memory_mb": int(lim.memory_mb), "cpu_s": max(1, int(lim.timeout_s + 1)),
                   "fsize_mb": int(lim.fsize_mb), "nproc": int(lim.nproc),
                   "wall_s": int(lim.timeout_s) + 3},
    }
    if host_dir and iso["drop_uid"] is not None:
        os.chown(host_dir, iso["drop_uid"], iso["drop_uid"])
    body = json.dumps(payload).encode()
    secret = json.dumps({"tests": tests, "entry_point": entry_point,
                         "stdio_cases": stdio}).encode()
    read_fd, write_fd = os.pipe()
    cmd = list(iso["prefix"] or []) + [sys.executable, "-I", _HARNESS, token, str(write_fd)]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(write_fd,), cwd=host_dir or "/", env=_clean_env(work_dir),
            start_new_session=True,
        )
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
        return SandboxResult(False, "error", f"could not start the sandbox: {exc}",
                             isolation=iso["mode"])
    os.close(write_fd)
    outputs = {"stdout": bytearray(), "stderr": bytearray()}
    verdict = bytearray()
    timed_out = False
    try:
        try:
            proc.stdin.write(struct.pack("<Q", len(body)) + body
                             + struct.pack("<Q", len(secret)) + secret + nonce.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(read_fd, selectors.EVENT_READ, "verdict")
        deadline = start + lim.timeout_s
        verdict_open = True
        while verdict_open:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=left):
                fd = key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()
                chunk = os.read(fd, 65536)
                if key.data == "verdict":
                    if not chunk:
                        verdict_open = False
                    verdict += chunk[: 4096 - len(verdict)]
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = outputs[key.data]
                buf += chunk[: max(0, lim.output_cap_bytes - len(buf))]  # the rest is dropped
        sel.close()
    finally:
        _kill_tree(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        os.close(read_fd)
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
    wall = time.monotonic() - start
    out = outputs["stdout"].decode("utf-8", "replace")
    err = outputs["stderr"].decode("utf-8", "replace")
    common = dict(stdout=out, stderr=err, wall_s=wall, isolation=iso["mode"], run_id=token)
    if timed_out:
        return SandboxResult(False, "timeout", f"no verdict within {lim.timeout_s} s", **common)
    try:
        result = json.loads(bytes(verdict).decode())
    except (ValueError, UnicodeDecodeError):
        return SandboxResult(False, "crashed", "the judge ended without a verdict "
                             f"(exit code {proc.returncode}); stderr: {err[-300:]}", **common)
    if not isinstance(result, dict) or result.get("nonce") != nonce:
        return SandboxResult(False, "error", "verdict without the right nonce", **common)
    if result.get("passed") is True:
        return SandboxResult(True, "passed", "", **common)
    return SandboxResult(False, "failed", str(result.get("error", ""))[:1000], **common)
