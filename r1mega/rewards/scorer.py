"""Score a batch of completions: a weighted sum of named rewards per task kind, computed in a
persistent pool of worker processes, each call time-boxed.

The trainer sees only :class:`RewardScorer`. A reward that raises, hangs past its time box or
kills its worker scores 0 for that component; the item carries the error (a reference without
the fields a reward needs too), ``metrics()`` counts it, the worker is replaced, and ``score``
returns normally: the trainer counts the errors of a step and stops the run past
``rewards.max_error_rate``. A reward that cannot run at all is found before any scoring by
:meth:`RewardScorer.self_check`, which raises :class:`RewardSetupError` naming the cause.

A line's ``kind`` picks the weighted spec of that task kind; a kind that is no task kind but a
registered reward's name scores that reward alone (``{"kind": "format"}`` in ``r1mega reward``).

The pool is persistent (started once; workers stay warm with sympy and math-verify imported,
and each runs the warm-ups of the rewards the specs name before it reports ready) because the
CPU demo scores ~100 completions per step and a per-batch pool start would cost seconds. Work units are (item, reward) pairs so a slow sandbox run does not hold up the cheap
format checks of the same batch.

:meth:`RewardScorer.stream` scores items as they arrive: the rollout hands over each completion
when it finishes, a thread keeps the pool busy with them while decoding goes on, and
``results()`` returns what ``score`` would have returned for all of them, in submission order.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from r1mega.rewards.stream import ScoringStream
from r1mega.rewards.registry import (MissingReference, RewardSetupError, get_reward,
                                     list_rewards, run_self_check, warm_up)

# Used for a task kind that rewards.spec does not name; rewards.spec entries replace these.
DEFAULT_SPECS = {
    "math": {"math_accuracy": 1.0, "format": 0.1},
    # Integer answers: the exact path is as right as sympy here and ~100x cheaper per item.
    "arithmetic": {"exact_match": 1.0},
    "countdown": {"countdown": 1.0, "format": 0.1},
    "river_crossing": {"river_crossing": 1.0, "format": 0.1},
    "code": {"code_tests": 1.0, "format": 0.1},
    "reasoning_gym": {"reasoning_gym": 1.0, "format": 0.1},
}
_START_TIMEOUT_S = 120.0
_CONTEXT_KEYS = ("overlong_penalty_tokens", "target_language", "math_timeout_s",
                 "sandbox_timeout_s", "sandbox_memory_mb", "answer_form", "reward_model_dir")
# A unit named SELF_CHECK + reward runs that reward's self-check instead of scoring.
_SELF_CHECK = "self_check:"


@dataclass
class ScoredItem:
    total: float
    components: dict = field(default_factory=dict)  # reward name -> unweighted score
    reasons: dict = field(default_factory=dict)  # reward name -> list of notes
    error: str | None = None


def _import_modules(modules) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"rewards.modules: cannot import '{name}' ({exc}); it must be "
                              "importable in a fresh Python process (on sys.path).") from None


def _worker_main(conn, modules, warm=()) -> None:
    # The trainer's Ctrl-C goes to the whole foreground group; the parent decides, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _import_modules(modules)
    try:
        import math_verify  # noqa: F401 -- warm import so the first call is not the slow one
    except ImportError:
        pass
    # Before "ready": the parent starts a call's clock when it sends the call, and the workers
    # start with the trainer, so this overlaps its model building.
    warm_up(warm)
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        uid, name, completion, reference, context = msg
        conn.send((uid, *_score_unit(name, completion, reference, context)))


def _score_unit(name, completion, reference, context) -> tuple:
    """(score, reasons, error) of one unit, in whichever process runs it."""
    try:
        if name.startswith(_SELF_CHECK):
            checked = run_self_check(name[len(_SELF_CHECK):], **context)
            return 1.0, ["self-check passed" if checked else "no self-check"], None
        res = get_reward(name)(completion, reference, **context)
        return float(res.score), list(res.reasons), None
    except (MissingReference, RewardSetupError) as exc:  # their messages name the reward
        return 0.0, [], str(exc)[:500]
    except Exception as exc:  # noqa: BLE001 -- reported as this component's error
        return 0.0, [], f"{name} raised {type(exc).__name__}: {exc}"[:500]


class _Worker:
    """One worker: a plain ``python -m r1mega.rewards.scorer --worker FD`` child over a socket.

    Not ``multiprocessing``: its spawn and forkserver modes re-import the trainer's main script
    in every worker, so a launch script without an ``if __name__ == "__main__"`` guard would
    start training again in each of them; a fresh interpreter imports only what rewards need.
    """

    def __init__(self, modules, warm=()):
        parent, child = socket.socketpair()
        # The workers see the modules the parent sees (a checkout not pip-installed, tests).
        path = os.pathsep.join(p for p in sys.path if p)
        env = dict(os.environ, PYTHONPATH=path)
        cmd = [sys.executable, "-m", "r1mega.rewards.scorer", "--worker", str(child.fileno()),
               ",".join(warm), *modules]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), env=env,
                                         stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        self.unit = None  # (uid, deadline, name) while busy
        self.ready = False  # set by the worker's first message, once its imports are done
        self.start_deadline = time.monotonic() + _START_TIMEOUT_S

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.conn.close()


class RewardScorer:
    """``score(items)`` for items ``{kind, completion, reference, truncated, num_tokens}``."""

    def __init__(self, rewards_cfg, max_new_tokens: int = 0, num_workers: int | None = None):
        self.cfg = rewards_cfg
        self.max_new_tokens = int(max_new_tokens)
        self.num_workers = rewards_cfg.num_workers if num_workers is None else num_workers
        # Copies: the overlong penalty below is added per scorer, never into DEFAULT_SPECS.
        self.specs = {k: dict(v) for k, v in {**DEFAULT_SPECS, **rewards_cfg.spec}.items()}
        if rewards_cfg.overlong_penalty_tokens > 0:
            for spec in self.specs.values():
                spec.setdefault("overlong_penalty", 1.0)
        if rewards_cfg.truncated not in ("keep", "zero"):
            raise ValueError(f"rewards.truncated='{rewards_cfg.truncated}': use 'keep' or 'zero'.")
        _import_modules(rewards_cfg.modules)
        for kind, spec in self.specs.items():
            if not isinstance(spec, dict):
                raise ValueError(f"rewards.spec.{kind} must map reward names to weights, got "
                                 f"{spec!r}.")
            for name, weight in spec.items():
                get_reward(name)  # unknown names fail here, at start-up, with a suggestion
                if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise ValueError(f"rewards.spec.{kind}.{name}: the weight must be a number, "
                                     f"got {weight!r}.")
        # Every reward a spec names: a worker may be handed any of them.
        self._warm = sorted({name for spec in self.specs.values() for name in spec})
        self._checked: set = set()  # rewards whose self-check passed
        self._check_thread: "threading.Thread | None" = None
        self._check_error: "RewardSetupError | None" = None
        self._workers: list[_Worker] = []
        self._stream: "ScoringStream | None" = None  # while open, its thread owns the pool
        self._counts = {"items": 0, "calls": 0, "timeouts": 0, "crashes": 0, "errors": 0,
                        "bad_items": 0, "worker_restarts": 0, "seconds": 0.0}
        # Spawned now, without waiting: their imports overlap the trainer's own start-up.
        for _ in range(max(0, self.num_workers)):
            self._workers.append(_Worker(rewards_cfg.modules, self._warm))

    # ------------------------------------------------------------------ public

    def self_check(self, kinds=None, block: bool = True) -> None:
        """Prove that every reward the task ``kinds`` use (None: every kind with a spec) can run
        here, each once per scorer, on the pool as scoring would: the sandbox passes a known-good
        and fails a known-bad program, math-verify parses and compares a known pair, optional
        packages import. Raises :class:`RewardSetupError` naming each reward that cannot run.

        ``block=False`` runs the checks on a thread, so that the workers' start-up still overlaps
        the caller's (the trainer's first rollout); the next ``score``, ``stream`` or
        ``self_check`` waits for it and raises its error."""
        self._join_self_check()
        self._check_no_stream("self_check")
        names = set()
        for kind in sorted(self.specs) if kinds is None else sorted(set(kinds)):
            spec = self.spec_for(kind)
            if spec is None:
                raise RewardSetupError(self._no_spec_message(kind))
            names.update(spec)
        todo = sorted(names - self._checked)
        if not todo:
            return
        if block:
            self._run_self_checks(todo)
            return

        def run():
            try:
                self._run_self_checks(todo)
            except RewardSetupError as exc:
                self._check_error = exc
            except Exception as exc:  # noqa: BLE001 -- surfaced by the next pool user
                self._check_error = RewardSetupError(
                    f"reward self-check failed: {type(exc).__name__}: {exc}")

        self._check_thread = threading.Thread(target=run, name="reward-self-check", daemon=True)
        self._check_thread.start()

    def _run_self_checks(self, names: list) -> None:
        context = {k: getattr(self.cfg, k) for k in _CONTEXT_KEYS}
        units = [(uid, -1, _SELF_CHECK + n, "", {}, context) for uid, n in enumerate(names)]
        outcomes = self._run(units)
        self._counts["calls"] -= len(units)  # not scoring calls
        failed = []
        for uid, name in enumerate(names):
            _score, _reasons, error = outcomes.get(uid, (0.0, [], "no result"))
            if error:
                failed.append(f"{name}: {error}")
            else:
                self._checked.add(name)
        if failed:
            raise RewardSetupError(
                "a reward cannot run here, so every completion would score 0 on it: "
                + " | ".join(" ".join(f.split()) for f in failed))

    def _join_self_check(self) -> None:
        if self._check_thread is not None:
            self._check_thread.join()
            self._check_thread = None
        if self._check_error is not None:
            error, self._check_error = self._check_error, None
            raise error

    def score(self, items: list) -> list[ScoredItem]:
        """One :class:`ScoredItem` per item, in order; never raises (see the module doc) except
        :class:`RewardSetupError` from a self-check started with ``block=False``."""
        self._join_self_check()
        self._check_no_stream("score")
        try:
            return self._score(items)
        except Exception as exc:  # noqa: BLE001 -- a scorer bug costs rewards, not the run
            self._counts["errors"] += 1
            return [ScoredItem(0.0, error=f"reward scorer failed: {type(exc).__name__}: {exc}")
                    for _ in items]

    def stream(self) -> "ScoringStream":
        """Start scoring items as they come (see :class:`ScoringStream`); the pool is the
        stream's until its ``results()`` or ``cancel()``."""
        self._join_self_check()
        self._check_no_stream("stream")
        self._stream = ScoringStream(self)
        return self._stream

    def _check_no_stream(self, what: str) -> None:
        if self._stream is not None:
            raise RuntimeError(f"RewardScorer.{what}() while a scoring stream is open; call its "
                               "results() (or cancel()) first: the stream's thread owns the pool.")

    def _score(self, items: list) -> list[ScoredItem]:
        start = time.monotonic()
        results, units = [], []
        self._plan_into(items, results, units)
        return self._assemble(items, results, units, self._run(units), start)

    def _plan_into(self, items: list, results: list, units: list) -> None:
        """Plan ``items``, appending their results and (uid, item index, name, ...) units to
        ``results`` and ``units`` (uids and indices continue from what the lists hold)."""
        for item in items:
            res, item_units = self._plan(item)
            i = len(results)
            results.append(res)
            units += [(len(units) + j, i, *u) for j, u in enumerate(item_units)]

    def _assemble(self, items, results, units, outcomes, start: float) -> list[ScoredItem]:
        for uid, i, name, *_ in units:
            score, reasons, error = outcomes.get(uid, (0.0, [], f"{name}: no result"))
            res = results[i]
            res.components[name] = score
            res.reasons[name] = reasons
            if error:
                res.error = f"{res.error}; {error}" if res.error else error
        for i, res in enumerate(results):
            if res.error and not res.components:
                continue
            spec = (self.spec_for(items[i].get("kind")) or {}) if isinstance(items[i], dict) \
                else {}
            res.total = float(sum(w * res.components.get(n, 0.0) for n, w in spec.items()))
        self._counts["items"] += len(items)
        self._counts["seconds"] += time.monotonic() - start
        return results

    def metrics(self) -> dict:
        """Cumulative counts since construction (the trainer logs differences)."""
        return dict(self._counts, num_workers=len(self._workers))

    def close(self) -> None:
        if self._check_thread is not None:
            self._check_thread.join()
            self._check_thread = None
        if self._stream is not None:
            self._stream.cancel()
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            try:
                w.proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
            w.kill()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ internals

    def spec_for(self, kind) -> "dict | None":
        """The weighted spec of a task kind; a registered reward's name alone: that reward."""
        spec = self.specs.get(kind)
        if spec is None and isinstance(kind, str) and kind in list_rewards():
            spec = {kind: 1.0}
        return spec

    def _no_spec_message(self, kind) -> str:
        return (f"no reward spec for kind {kind!r}; add rewards.spec.{kind}, or use a task kind "
                f"{sorted(self.specs)} or a reward name {list_rewards()}")

    def _plan(self, item) -> tuple[ScoredItem, list]:
        if not isinstance(item, dict) or not isinstance(item.get("completion"), str):
            self._counts["bad_items"] += 1
            return ScoredItem(0.0, error="item must be a dict with a string 'completion'"), []
        kind = item.get("kind")
        spec = self.spec_for(kind)
        if spec is None:
            self._counts["bad_items"] += 1
            return ScoredItem(0.0, error=self._no_spec_message(kind)), []
        reference = item.get("reference") or {}
        if isinstance(reference, str):
            try:
                reference = json.loads(reference)
            except ValueError:
                reference = None
        if not isinstance(reference, dict):
            self._counts["bad_items"] += 1
            return ScoredItem(0.0, error="'reference' must be a JSON object"), []
        if item.get("truncated") and self.cfg.truncated == "zero":
            return ScoredItem(0.0, {n: 0.0 for n in spec},
                              {n: ["truncated: scored 0 (rewards.truncated=zero)"] for n in spec}), []
        context = {k: getattr(self.cfg, k) for k in _CONTEXT_KEYS}
        context.update(num_tokens=item.get("num_tokens"), truncated=bool(item.get("truncated")),
                       max_new_tokens=item.get("max_new_tokens", self.max_new_tokens), kind=kind,
                       prompt=item.get("prompt"))
        return ScoredItem(0.0), [(n, item["completion"], reference, context) for n in spec]

    def _timeout_for(self, name: str) -> float:
        runs = 1
        if name.startswith(_SELF_CHECK):  # the sandbox's check runs two programs
            name, runs = name[len(_SELF_CHECK):], 2
        if name == "code_tests":  # the sandbox keeps its own clock; leave it room to report
            return max(self.cfg.timeout_s, runs * (self.cfg.sandbox_timeout_s + 5.0))
        return runs * self.cfg.timeout_s

    def _run(self, units: list, feed: "ScoringStream | None" = None) -> dict:
        """uid -> (score, reasons, error) for every unit; with ``feed``, also for the units it
        hands over until it is closed (the stream's thread runs this)."""
        out: dict = {}
        if not units and feed is None:
            return out
        self._counts["calls"] += len(units)
        if self.num_workers <= 0:
            return self._run_inline(units)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.cfg.modules, self._warm))
        todo = deque(units)
        failed_starts = 0
        while True:
            if feed is not None and feed.cancelled:
                for w in self._workers:
                    if w.unit:  # its late answer would reach the pool's next user
                        self._replace(w)
                break
            # Closed is read before taking: whatever was submitted before the close is taken.
            more = feed is not None and not feed.closed
            if feed is not None:
                new = feed.take()
                self._counts["calls"] += len(new)
                todo.extend(new)
            if not (todo or more or any(w.unit for w in self._workers)):
                break
            if failed_starts > 2 * self.num_workers:
                # Workers die while starting (a broken rewards.modules, no memory): give every
                # remaining call its error instead of looping forever.
                for uid, _i, name, *_ in todo:
                    out[uid] = (0.0, [], f"{name}: reward workers fail to start")
                    self._counts["crashes"] += 1
                todo.clear()
                if not more:
                    break
                feed.wait_for_more()
                continue
            for w in self._workers:
                if w.ready and w.unit is None and todo:
                    uid, _i, name, completion, reference, context = todo.popleft()
                    try:
                        w.conn.send((uid, name, completion, reference, context))
                        w.unit = (uid, time.monotonic() + self._timeout_for(name), name)
                    except (OSError, ValueError):
                        out[uid] = (0.0, [], f"{name}: could not reach a reward worker")
                        self._counts["crashes"] += 1
                        self._replace(w)
                    except Exception as exc:  # noqa: BLE001 -- e.g. a reference pickle refuses
                        out[uid] = (0.0, [], f"{name}: cannot send the item to a worker "
                                    f"({type(exc).__name__}: {exc})"[:500])
                        self._counts["errors"] += 1
            waiting = [w for w in self._workers if w.unit or not w.ready]
            if not waiting:
                if more and not todo:
                    feed.wait_for_more()  # every worker idle: sleep until items or the close
                continue
            # A worker's clock starts when it is ready: its imports (sympy) are not the call's.
            deadlines = [w.unit[1] if w.unit else w.start_deadline for w in waiting]
            left = min(deadlines) - time.monotonic()
            conns = [w.conn for w in waiting] + ([feed.wake] if more else [])
            ready = wait(conns, timeout=max(0.0, left))
            if more and feed.wake in ready:
                feed.clear_wake()
            for w in waiting:
                if not w.ready:
                    if w.conn in ready:
                        try:
                            w.ready = w.conn.recv() == "ready"
                            failed_starts = 0
                        except (EOFError, OSError):
                            failed_starts += 1
                            self._replace(w)
                    elif time.monotonic() >= w.start_deadline:
                        failed_starts += 1
                        self._replace(w)
                    continue
                uid, deadline, name = w.unit
                if w.conn in ready:
                    try:
                        ruid, score, reasons, error = w.conn.recv()
                    except (EOFError, OSError):
                        out[uid] = (0.0, [], f"{name}: the reward worker died (crash or "
                                    "out of memory)")
                        self._counts["crashes"] += 1
                        self._replace(w)
                        continue
                    out[ruid] = (score, reasons, error)
                    self._counts["errors"] += error is not None
                    w.unit = None
                elif time.monotonic() >= deadline:
                    out[uid] = (0.0, [], f"{name}: timed out after {self._timeout_for(name)} s")
                    self._counts["timeouts"] += 1
                    self._replace(w)
        return out

    def _replace(self, w: _Worker) -> None:
        w.kill()
        idx = self._workers.index(w)
        self._workers[idx] = _Worker(self.cfg.modules, self._warm)
        self._counts["worker_restarts"] += 1

    def _run_inline(self, units: list) -> dict:
        """num_workers=0: same process, no hard time box (math-verify's own alarms only)."""
        out = {}
        for uid, _i, name, completion, reference, context in units:
            out[uid] = _score_unit(name, completion, reference, context)
            self._counts["errors"] += out[uid][2] is not None
        return out

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


def worker_pids(scorer: RewardScorer) -> list[int]:
    """For tests and debugging: the live worker processes."""
    return [w.proc.pid for w in scorer._workers if w.is_alive()]


__all__ = ["RewardScorer", "RewardSetupError", "ScoredItem", "ScoringStream", "DEFAULT_SPECS",
           "worker_pids"]


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--worker":
    _worker_main(Connection(int(sys.argv[2])), sys.argv[4:], [n for n in sys.argv[3].split(",") if n])
