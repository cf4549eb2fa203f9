"""The program that runs inside the code sandbox (stdlib only; started by ``sandbox.py``).

Two processes, so that untrusted code can never decide the verdict:

* the **judge** (this script's first process) holds the unit tests, the result pipe and the nonce.
  It never executes a line of the completion.
* the **candidate** (a fork of the judge, made before the nonce is read) executes the completion
  and then serves calls: the judge runs the tests with proxies in place of the completion's
  functions, sends the arguments over a pipe, and gets back plain data.

Whatever the completion does to its own interpreter (exit early, patch ``builtins``, redefine
``AssertionError``, return an object whose ``__eq__`` is always true, print a success marker)
cannot reach the assertions, which run in the judge on values rebuilt from a pickle stream that
admits no classes at all. The result pipe is closed in the candidate before its code runs, and
the judge is another user (or undumpable), so the candidate can neither write a verdict nor read
the judge's memory. Invocation: ``python -I _sandbox_harness.py TOKEN RESULT_FD``; stdin carries
a length-prefixed JSON payload (program, limits), then a length-prefixed JSON object with the tests
and entry point, then the 32-byte nonce; the last two are read only after the fork.
"""
import builtins
import ctypes
import io
import json
import os
import pickle
import re
import resource
import signal
import struct
import sys

_MAX_MESSAGE_BYTES = 64 << 20


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        part = os.read(fd, n - got)  # exact-length reads: nothing of the nonce is buffered early
        if not part:
            raise EOFError("stream closed")
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


def _send(fd, obj):
    data = pickle.dumps(obj, protocol=4)
    os.write(fd, struct.pack("<Q", len(data)))
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _recv_raw(fd):
    (n,) = struct.unpack("<Q", _read_exact(fd, 8))
    if n > _MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {n} bytes is over the {_MAX_MESSAGE_BYTES} byte cap")
    return _read_exact(fd, n)


class _PlainUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without a global: int, float, str, bytes, bool, None,
    list, tuple, dict, set, frozenset. Subclasses and custom objects need a global -> refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"candidate returned an object of {module}.{name}; only "
                                     "plain data (numbers, strings, lists, dicts, ...) is accepted")


def _recv_plain(fd):
    return _PlainUnpickler(io.BytesIO(_recv_raw(fd))).load()


def _libc():
    return ctypes.CDLL(None, use_errno=True)


# Every world-writable place: a fresh tmpfs over each, so writes outside the work dir fail and
# nothing written survives the namespace.
_MASKED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_MS_BIND, _MS_REC = 4096, 16384


def _python_trees():
    """The directories the candidate's imports need: the interpreter's prefixes (a venv's own
    site-packages, the stdlib of its base). Nested ones fold into their parent."""
    paths = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix,
                                                  sys.exec_prefix, sys.base_exec_prefix)})
    return [p for p in paths if not any(p.startswith(q + os.sep) for q in paths if q != p)]


def _under(path, parents):
    return any(path == d or path.startswith(d + os.sep) for d in parents)


def _hold_masked_trees():
    """Open the Python trees that the tmpfs is about to cover (a venv or a checkout under /tmp)
    while they are still reachable: a directory fd keeps its place in the covered mount, and
    ``/proc/self/fd/N`` can then be bind-mounted back to the same path on top of the tmpfs."""
    held = []
    for path in _python_trees():
        if _under(path, _MASKED_DIRS):
            held.append((path, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
    return held


def _bind_back(libc, held, writable_roots=()):
    """Re-expose the held trees at their own paths on the fresh tmpfs. Only those trees come
    back (the rest of a checkout around a venv stays hidden), and ``_read_only_elsewhere`` then
    makes them read-only like every other mount. Under a tmpfs that stays writable (/tmp, home
    with the work dir) the directories leading to a tree sit on a small tmpfs of their own, which
    is made read-only too: a candidate that keeps our uid cannot add files next to the tree."""
    skeletons = set()
    for path, fd in held:
        cur = "/"
        for part in path.strip("/").split("/"):
            parent, cur = cur, os.path.join(cur, part)
            if not os.path.isdir(cur):
                os.mkdir(cur)
                os.chmod(cur, 0o755)  # reachable by nobody whatever the original modes were
            if parent in writable_roots and cur != path and cur not in skeletons:
                if libc.mount(b"tmpfs", cur.encode(), b"tmpfs", 0, b"size=1m,mode=0755") != 0:
                    raise OSError(ctypes.get_errno(), f"mount tmpfs on {cur} failed")
                skeletons.add(cur)
        src = f"/proc/self/fd/{fd}".encode()
        if libc.mount(src, path.encode(), None, _MS_BIND | _MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind back {path} over the tmpfs failed")
        os.close(fd)


def _isolate_filesystem(uid):
    """Inside a private mount namespace: fresh tmpfs over every world-writable place, the Python
    trees under those places bound back read-only, every other mount read-only. Returns the
    work dir (the cwd), the only writable place."""
    libc = _libc()
    held = _hold_masked_trees()
    for path in _MASKED_DIRS:
        if os.path.isdir(path):
            opts = b"size=64m,mode=0755"
            if libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, opts) != 0:
                raise OSError(ctypes.get_errno(), f"mount tmpfs on {path} failed")
    _bind_back(libc, held, writable_roots=_MASKED_DIRS)
    if uid is not None:
        _expose_python(libc)
    _read_only_elsewhere(libc, keep=_MASKED_DIRS)
    work, n = "/tmp/work", 0
    while os.path.lexists(work):  # a Python tree bound back at /tmp/work: pick another name
        n += 1
        work = f"/tmp/work{n}"
    os.mkdir(work, 0o700)
    if uid is not None:
        os.chown(work, uid, uid)
    os.chdir(work)
    os.environ["HOME"] = work
    return work


_MOUNT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
                "relatime": 1 << 21, "strictatime": 1 << 24}


def _read_only_elsewhere(libc, keep):
    """Remount every other mount read-only (in our namespace only). Without this a candidate
    that keeps our uid (user-namespace mode, no root to drop from) could write the user's
    files: checkpoints, the repository, the home directory. The flags a mount already has are
    kept, because a user namespace may add restrictions but never lift them."""
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    failed = []
    for line in lines:
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point in keep or point == "/proc" or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= _MOUNT_FLAGS.get(opt, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            failed.append(f"{point} (errno {ctypes.get_errno()})")
    if failed:
        # Reported, not fatal: the uid drop still guards these where we run as root.
        sys.stderr.write(f"sandbox: could not make read-only: {', '.join(failed[:10])}\n")


def _expose_python(libc):
    """The candidate runs as ``nobody``, but Python may live under a private directory (``/root``
    with pyenv). Lay a tmpfs over that directory and bind only the Python tree back: the
    candidate can import the stdlib and site-packages and sees nothing else of that home."""
    by_top = {}
    for path in _python_trees():
        top, cur = None, os.path.dirname(path)
        while cur not in ("/", ""):
            if not os.stat(cur).st_mode & 0o001:
                top = cur
            cur = os.path.dirname(cur)
        if top is not None:
            by_top.setdefault(top, set()).add(path)
    for top, paths in sorted(by_top.items()):
        held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)) for p in sorted(paths)]
        if libc.mount(b"tmpfs", top.encode(), b"tmpfs", 0, b"size=1m,mode=0755") != 0:
            raise OSError(ctypes.get_errno(), f"mount tmpfs on {top} failed")
        _bind_back(libc, held)


def _drop_capability_bounding_set():
    """Empty the bounding set (needs CAP_SETPCAP, so before any uid change): no later execve,
    not even of a setuid binary or as root, can gain a capability back."""
    PR_CAPBSET_DROP = 24
    libc = _libc()
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break  # EINVAL: past the kernel's last capability


def _clear_capabilities():
    """Without this a candidate that keeps uid 0 of a user namespace (non-root users, ``-r``)
    holds every capability there: it could remount our read-only mounts writable again (the
    mounts were made read-only in that same namespace) and write the user's files."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = _libc()
    PR_SET_NO_NEW_PRIVS = 38
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    data = (Data * 2)()  # all zero: no capability in any set
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_VERSION_3
        raise OSError(ctypes.get_errno(), "capset: could not drop the candidate's capabilities")


def _limit(which, value):
    value = int(value)
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        resource.setrlimit(which, (min(value, hard) if hard >= 0 else value, hard))


def _install_guards(work_dir, block_network):
    """Best-effort Python-level guards, used only where the kernel gave no namespaces."""
    work_dir = os.path.realpath(work_dir)

    def hook(event, args):
        if block_network and event in ("socket.connect", "socket.bind", "socket.sendto",
                                       "socket.sendmsg", "socket.getaddrinfo"):
            raise PermissionError(f"sandbox: network is disabled ({event})")
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            path = os.fsdecode(args[0])
            if writes and not os.path.realpath(path).startswith(work_dir + os.sep):
                raise PermissionError(f"sandbox: writing outside the work dir is denied ({path})")

    sys.addaudithook(hook)


def _flush():
    # The candidate is killed, not exited, once the verdict is in: push its prints out first so
    # that users debugging a reward see them.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- the program may have replaced or closed them
            pass


def _stdio_runner(code):
    """Standard-input tasks: each call runs the whole program as ``__main__`` on one input and
    returns what it printed. ``.buffer`` works on both streams (fast-I/O solutions use it)."""

    def run(stdin_text):
        out_bytes = io.BytesIO()
        out = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
        saved = sys.stdin, sys.stdout
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin_text.encode()), encoding="utf-8")
        sys.stdout = out
        try:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})  # noqa: S102
        except SystemExit as exc:  # exit() at the end of a solution is normal; a status is not
            if exc.code not in (None, 0):
                raise RuntimeError(f"the program exited with status {exc.code!r}") from None
        finally:
            sys.stdin, sys.stdout = saved
            out.flush()
        return out_bytes.getvalue().decode("utf-8", "replace")

    return run


def _same_output(got, want):
    # Judges of such tasks ignore trailing spaces and trailing blank lines, nothing else.
    def norm(text):
        return "\n".join(line.rstrip() for line in text.rstrip().splitlines())

    return isinstance(got, str) and norm(got) == norm(want)


def _run_candidate(payload, to_judge, from_judge):
    """The forked child: limits, privileges dropped, then the untrusted program, then serve."""
    lim = payload["limits"]
    _limit(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    _limit(resource.RLIMIT_CPU, lim["cpu_s"])
    _limit(resource.RLIMIT_FSIZE, lim["fsize_mb"] << 20)
    _limit(resource.RLIMIT_NOFILE, 256)
    _limit(resource.RLIMIT_CORE, 0)
    uid = payload.get("drop_uid")
    _drop_capability_bounding_set()
    if uid is not None:
        _limit(resource.RLIMIT_NPROC, lim["nproc"])  # counts per user: only real with its own uid
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _clear_capabilities()
    PR_SET_PDEATHSIG = 1
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
    if os.getppid() == 1 and not payload.get("isolated"):
        os._exit(1)  # the judge is already gone
    if not payload.get("isolated"):
        _install_guards(os.getcwd(), block_network=not payload.get("netns"))
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        code = compile(payload["program"], "<completion>", "exec")
        if payload.get("stdio"):
            namespace = {"__main__": _stdio_runner(code)}
        else:
            exec(code, namespace)  # noqa: S102 -- the whole point: run it, in here only
    except BaseException as exc:  # noqa: BLE001 -- anything the program raises is a failed run
        _send(to_judge, ("error", f"the program raised {type(exc).__name__}: {exc}"[:500]))
        os._exit(1)
    names = [k for k, v in namespace.items() if callable(v) and (k == "__main__" or
                                                                   not k.startswith("__"))]
    _flush()
    _send(to_judge, ("ready", names))
    while True:
        name, args, kwargs = pickle.loads(_recv_raw(from_judge))
        try:
            value = namespace[name](*args, **kwargs)
            _flush()
            _send(to_judge, ("ok", value))
        except BaseException as exc:  # noqa: BLE001 -- reported to the judge as the call's error
            _send(to_judge, ("exc", type(exc).__name__, str(exc)[:500]))


class CandidateError(Exception):
    """An exception raised in the candidate whose type is not a plain builtin one."""


def _exception_for(type_name, message):
    cls = getattr(builtins, type_name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(message)
    return CandidateError(f"{type_name}: {message}")


def _judge(payload, nonce, to_cand, from_cand):
    status = from_cand_msg = _recv_plain(from_cand)
    if status[0] != "ready":
        return False, str(from_cand_msg[1])

    def proxy_for(name):
        def call(*args, **kwargs):
            try:
                _send(to_cand, (name, args, kwargs))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise CandidateError(f"arguments of {name} cannot be sent: {exc}") from None
            reply = _recv_plain(from_cand)
            if reply[0] == "ok":
                return reply[1]
            raise _exception_for(reply[1], reply[2])

        call.__name__ = name
        return call

    cases = payload.get("stdio_cases")
    if cases is not None:
        run = proxy_for("__main__")
        for i, case in enumerate(cases, 1):
            got = run(str(case["input"]))
            if not _same_output(got, str(case["output"])):
                return False, (f"case {i}: expected {str(case['output'])[:80]!r}, "
                               f"got {str(got)[:80]!r}")
        return True, ""
    ns = {"__name__": "__tests__"}
    for name in status[1]:
        ns[name] = proxy_for(name)
    exec(compile(payload["tests"], "<tests>", "exec"), ns)  # noqa: S102 -- trusted test code
    entry = payload.get("entry_point")
    if entry and callable(ns.get("check")):
        if entry not in status[1]:
            return False, f"the program defines no function named {entry!r}"
        ns["check"](proxy_for(entry))
    return True, ""


def main():
    result_fd = int(sys.argv[2])
    (n,) = struct.unpack("<Q", _read_exact(0, 8))
    payload = json.loads(_read_exact(0, n))
    uid = payload.get("drop_uid")
    # Our own clock, in case whoever started us died and nobody will kill us: exit and take the
    # namespace (and, through PDEATHSIG, the candidate) with us.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(int(payload["limits"]["wall_s"]))
    if payload.get("isolated"):
        _isolate_filesystem(uid)
    else:
        PR_SET_CHILD_SUBREAPER = 36
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans stay ours, to be swept
    lim = payload["limits"]
    _limit(resource.RLIMIT_AS, (lim["memory_mb"] << 20) + (1 << 30))
    _limit(resource.RLIMIT_CORE, 0)
    PR_SET_DUMPABLE = 4
    _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # same-uid candidates cannot ptrace or read us
    c_read, j_write = os.pipe()
    j_read, c_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(result_fd)
            os.close(j_write)
            os.close(j_read)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)  # the nonce still waits in the stdin pipe: cut it off first
            os.close(devnull)
            _run_candidate(payload, c_write, c_read)
        finally:
            os._exit(1)
    os.close(c_read)
    os.close(c_write)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # Only now, with the candidate forked off and its stdin cut, do the tests and the nonce come
    # in: the candidate's copy of our memory never held them, so it cannot read the expected
    # answers out of its own stack or heap.
    (n,) = struct.unpack("<Q", _read_exact(0, 8))
    payload.update(json.loads(_read_exact(0, n)))
    nonce = _read_exact(0, 32).decode()
    try:
        passed, error = _judge(payload, nonce, j_write, j_read)
    except AssertionError as exc:
        passed, error = False, f"AssertionError: {exc}"[:500]
    except EOFError:
        passed, error = False, "the candidate process ended before the tests finished"
    except BaseException as exc:  # noqa: BLE001 -- any failure of a test is a failed run
        passed, error = False, f"{type(exc).__name__}: {exc}"[:500]
    os.write(result_fd, json.dumps({"nonce": nonce, "passed": bool(passed), "error": error}).encode())
    os.close(result_fd)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
