"""``python -m r1mega.parallel.torchrun ARGS``: torchrun, with its failure report cut to one line.

When a worker exits non-zero, torchrun raises ``ChildFailedError`` in its own process and prints
a traceback of the launcher plus a table per rank, under the one line the failing r1mega rank
already printed (bad input, a lost peer). Here that becomes ``r1mega: torchrun: rank R exited
with code C`` and torchrun's exit code is the worker's (2 for bad input). ``R1MEGA_DEBUG=1``
keeps torchrun's full report.
"""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from r1mega.errors import debug_enabled

    if debug_enabled():
        torchrun_main(argv)
        return 0
    # The agent logs each failed worker at ERROR level too, next to the report below.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 1  # < 0: killed by a signal
        how = f"code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {-failure.exitcode}"
        print(f"r1mega: torchrun: rank {rank} exited with {how} (first of {len(exc.failures)} "
              f"failed; R1MEGA_DEBUG=1 for torchrun's report)", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
