"""Which rank went away? Each rank's (host, pid), exchanged once at start-up.

A collective that fails because a peer died reports only a socket ("Connection closed by peer
[10.0.0.3]:41234"), not a rank. With the table gathered while everyone was alive, a surviving rank
finds the dead ones among the peers on its own host by their process ids, and names them.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

_PEERS: list[tuple[str, int]] = []  # index = global rank; filled by record_peers()


def record_peers(group=None) -> None:
    """All-gather (hostname, pid) over the default group; once per process group."""
    import torch.distributed as dist

    global _PEERS
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        _PEERS = []
        return
    table: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(table, (socket.gethostname(), os.getpid()), group=group)
    _PEERS = [tuple(t) for t in table]


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - NoSuchProcess, or no psutil: fall back to a signal 0
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def dead_peers(my_rank: int) -> list[int]:
    """Ranks on this host whose process is gone (remote ranks cannot be checked from here)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_PEERS)
            if r != my_rank and h == host and not _alive(pid)]


def lost_contact_message(my_rank: int, world_size: Optional[int] = None) -> str:
    """'rank N lost contact with rank M' with M found as well as this host can tell."""
    world = world_size or len(_PEERS)
    dead = dead_peers(my_rank)
    if not dead and world == 2:
        dead = [1 - my_rank]  # the only peer there is
    if dead:
        who = "rank " + ", ".join(str(r) for r in dead) if len(dead) == 1 else \
            "ranks " + ", ".join(str(r) for r in dead)
    else:
        hosts = sorted({h for h, _ in _PEERS} - {socket.gethostname()})
        who = f"a rank on another host ({', '.join(hosts[:4]) or 'unknown'})"
    return f"rank {my_rank} lost contact with {who}"
