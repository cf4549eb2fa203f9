"""Scoring items while the caller goes on: the rollout hands over each completion as it
finishes and a thread keeps the reward pool busy with them (:meth:`RewardScorer.stream`)."""
from __future__ import annotations

import socket
import threading
import time
from multiprocessing.connection import wait


class ScoringStream:
    """Items scored on the scorer's pool while the caller goes on (the rollout decodes the rest):

        stream = scorer.stream()
        stream.submit(items)       # as completions finish; returns at once
        scored = stream.results()  # every submitted item's ScoredItem, in submission order

    The results equal ``scorer.score(all items)``: the same plan per item, the same units, the
    same time boxes and error handling, the same assembly; only the moment each unit is sent
    differs. A thread dispatches the units: it waits in ``select`` (no GIL held) for a worker's
    answer, a new submission or the close, so it costs the decoding thread only the moments it
    handles a message. With ``rewards.num_workers`` 0 the items are scored in ``results()``,
    as ``score`` would. Like ``score``, nothing here raises on a bad item or a scorer bug: the
    items get a zero reward and the error.
    """

    def __init__(self, scorer):
        self._scorer = scorer
        self._items: list = []
        self._results: list = []
        self._units: list = []  # every planned unit, in uid order
        self._handed = 0  # units already taken by the thread
        self._lock = threading.Lock()
        self.wake, self._wake_w = socket.socketpair()
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)  # a full buffer already means "wake up"
        self.closed = False
        self.cancelled = False
        self._error: str | None = None
        self._outcomes: dict = {}
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()

    def submit(self, items: list) -> None:
        if self.closed:
            raise RuntimeError("ScoringStream.submit() after results(): open a new stream.")
        s = self._scorer
        try:
            with self._lock:
                self._items += items
                s._plan_into(items, self._results, self._units)
            if s.num_workers > 0 and self._error is None:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name="reward-stream",
                                                    daemon=True)
                    self._thread.start()
                self._poke()
        except Exception as exc:  # noqa: BLE001 -- a scorer bug costs rewards, not the run
            self._error = self._error or f"reward scorer failed: {type(exc).__name__}: {exc}"

    def results(self) -> list:
        """Wait for every submitted item (a list of ScoredItem); the pool is the scorer's again
        afterwards."""
        from r1mega.rewards.scorer import ScoredItem  # the scorer imports this module

        s = self._scorer
        self._stop()
        try:
            if self._error is None:
                if s.num_workers <= 0:
                    self._outcomes = s._run(self._units)
                return s._assemble(self._items, self._results, self._units, self._outcomes,
                                   self._start)
        except Exception as exc:  # noqa: BLE001 -- as in score()
            self._error = f"reward scorer failed: {type(exc).__name__}: {exc}"
        s._counts["errors"] += 1
        return [ScoredItem(0.0, error=self._error) for _ in self._items]

    def cancel(self) -> None:
        """Drop what is not scored yet (the rollout failed); workers still busy are replaced."""
        self.cancelled = True
        self._stop()

    # -- the dispatch thread's side

    def take(self) -> list:
        with self._lock:
            new = self._units[self._handed:]
            self._handed = len(self._units)
        return new

    def wait_for_more(self) -> None:
        wait([self.wake])
        self.clear_wake()

    def clear_wake(self) -> None:
        try:
            while self.wake.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _serve(self) -> None:
        try:
            self._outcomes = self._scorer._run([], feed=self)
        except Exception as exc:  # noqa: BLE001 -- reported by results()
            self._error = f"reward scorer failed: {type(exc).__name__}: {exc}"

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _stop(self) -> None:
        self.closed = True
        self._poke()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._scorer._stream is self:
            self._scorer._stream = None
            self.wake.close()
            self._wake_w.close()
