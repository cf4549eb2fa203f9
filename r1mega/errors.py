"""One exception type for bad user input, and how the CLI reports it.

Whatever the user handed us — a config key, a data file or row, an HF directory, a checkpoint, a
prompt file, the launch environment — is wrong in a way a traceback does not help with. Code that
finds such a problem raises :class:`UserError` (or a subclass) with a message naming the key, file,
line or directory and the fix; ``r1mega.cli`` catches it once, prints one line and exits with 2.
``R1MEGA_DEBUG=1`` re-raises it instead, traceback included.

In a multi-rank run the message is printed once: ranks that share a process group agree through
its store on who reports first (and a rank whose collective then fails because the reporter left
finds the count there and leaves quietly); before a group exists every rank reads the same input,
so rank 0 speaks for all (unless the error concerns one rank's own environment). A reporting rank
leaves with ``os._exit`` because background threads (checkpoint writers, the gloo watchdog) may
wait on peers forever.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

EXIT_BAD_INPUT = 2
_STORE_KEY = "r1mega/user_error_reported"


class UserError(Exception):
    """Bad input from the user; the message names what is at fault and the fix."""

    # True when the error concerns this rank alone (e.g. its RANK variable), so every rank that
    # finds it must say so even before a process group exists.
    rank_specific = False


class UserFileError(UserError, FileNotFoundError):
    """A path the user gave does not exist (still a FileNotFoundError for callers that catch it)."""


class UserValueError(UserError, ValueError):
    """A value or file content the user gave is malformed."""


def debug_enabled() -> bool:
    return os.environ.get("R1MEGA_DEBUG", "") not in ("", "0")


def _dist():
    """torch.distributed if this process already imported it (`r1mega reward` never does: no
    process group can exist then, and importing torch just to learn that costs a second)."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _store():
    """The default process group's store, or None outside a process group."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    store.set_timeout(timedelta(seconds=5))
    return store


def _first_reporter() -> bool:
    """True if this rank should print: the first to count itself in the process group's store, or
    rank 0 when there is no group. A store that cannot be reached means print."""
    try:
        store = _store()
        if store is not None:
            return store.add(_STORE_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - no store, no agreement: speak rather than stay silent
        return True
    return os.environ.get("RANK", "0") == "0"


def peer_reported_user_error() -> bool:
    """Whether another rank already reported a user error: this rank's failed collective is then
    a consequence, not news. Counts this rank in as leaving (see :func:`_linger`)."""
    try:
        store = _store()
        if store is not None and store.check([_STORE_KEY]):
            store.add(_STORE_KEY, 1)
            return True
    except Exception:  # noqa: BLE001
        pass
    return False


def _linger(timeout_s: float = 5.0) -> None:
    """Stay until every rank has counted itself out (or ``timeout_s``): without torchrun's agent
    the store lives in rank 0's process, and peers still need it to learn that the error was
    reported rather than print one of their own."""
    import time

    try:
        store = _store()
        world = _dist().get_world_size()
        deadline = time.monotonic() + timeout_s
        while store.add(_STORE_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store went away: nobody is left to wait for
        pass


def report_user_error(exc: UserError, prog: str) -> int:
    """Print ``exc`` as one line (once per job) and return the exit code; in a process group,
    exit at once."""
    dist = _dist()
    in_group = dist is not None and dist.is_initialized()
    if getattr(exc, "rank_specific", False) or _first_reporter():
        message = " ".join(str(exc).split())  # one line, however the message was built
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    if in_group:
        sys.stdout.flush()
        _linger()
        os._exit(EXIT_BAD_INPUT)
    return EXIT_BAD_INPUT
