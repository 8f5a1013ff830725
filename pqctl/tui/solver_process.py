"""Searches in a child process, so that a cancelled one stops using the CPU at once.

HiGHS stops at its interrupt checks once :attr:`planner.search.SearchOptions.cancel` is set, but
its sub-MIP heuristics check no interrupt (a root node of a large placement MILP can go on for
seconds). The dashboard therefore searches in one long-lived child process
(``python -m pqctl.tui.solver_process``, started at the first solve): a cancel first asks the
child to stop (the planner's cancel hook), and kills it when it has not within
:data:`CANCEL_GRACE_S`; the next solve starts a fresh child. The child exits when the dashboard's
end of its pipe closes.

Wire format: pickled tuples over :class:`multiprocessing.connection.Connection` on the child's
stdin/stdout (the child points its own fd 1 at stderr, so nothing else writes there). Parent to
child: ``("solve", problem, options)``, ``("cancel",)``; child to parent:
``("progress", done, total)``, then one of ``("plan", plan_json)`` or ``("error", exception)``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from planner.errors import PlannerError, SolveCancelledError
from planner.plan import Plan
from planner.problem import PlanningProblem
from planner.search import ProgressFn, SearchOptions

CANCEL_GRACE_S = 0.4
"""How long a cancelled search may take to stop on its own before its process is killed."""


class SolverProcessError(RuntimeError):
    """The solver process died or answered nonsense; the message says what happened."""


class SolverProcess:
    """One child process that runs searches one at a time; thread-safe (a second search waits
    for the first)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process and self._process.poll() is None else None

    def solve(
        self,
        problem: PlanningProblem,
        options: SearchOptions,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> Plan:
        """Search ``problem`` in the child (started if need be) and return its plan.

        Raises:
            PlannerError: the search failed (bad input, infeasible); SolveCancelledError once
                ``cancel`` is set (the child has stopped, or was killed, by then).
            SolverProcessError: the child died.
        """
        with self._lock:
            to_child, from_child = self._connections()
            to_child.send(("solve", problem, replace(options, cancel=None)))
            cancelled_at: float | None = None
            while True:
                if cancel is not None and cancel.is_set() and cancelled_at is None:
                    cancelled_at = time.monotonic()
                    with contextlib.suppress(OSError):
                        to_child.send(("cancel",))
                if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    self._stop(kill=True)
                    raise SolveCancelledError("the solve was cancelled")
                reply = self._receive(from_child, 0.05)
                if reply is None:
                    continue
                if reply[0] == "progress":
                    if progress is not None and cancelled_at is None:
                        progress(int(reply[1]), int(reply[2]))
                    continue
                if cancelled_at is not None:
                    raise SolveCancelledError("the solve was cancelled")
                if reply[0] == "plan":
                    return Plan.from_json(str(reply[1]))
                if reply[0] == "error" and isinstance(reply[1], BaseException):
                    raise reply[1]
                raise SolverProcessError(f"the solver process answered {reply[0]!r}")

    def _receive(self, connection: Connection, timeout_s: float) -> tuple[Any, ...] | None:
        try:
            if not connection.poll(timeout_s):
                return None
            reply = connection.recv()
        except (EOFError, OSError):
            code = self._process.poll() if self._process else None
            self._stop(kill=True)
            raise SolverProcessError(f"the solver process died (exit code {code})") from None
        return reply if isinstance(reply, tuple) and reply else ("?",)

    def _connections(self) -> tuple[Connection, Connection]:
        if self._process is None or self._process.poll() is not None:
            self._stop(kill=True)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pqctl.tui.solver_process"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert self._process.stdin is not None and self._process.stdout is not None
            self._to_child = Connection(os.dup(self._process.stdin.fileno()), readable=False)
            self._from_child = Connection(os.dup(self._process.stdout.fileno()), writable=False)
            self._process.stdin.close()
            self._process.stdout.close()
        assert self._to_child is not None and self._from_child is not None
        return self._to_child, self._from_child

    def _stop(self, kill: bool) -> None:
        process, self._process = self._process, None
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                connection.close()  # the child reads end of file and exits
        self._to_child = self._from_child = None
        if process is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        try:
            process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(2.0)

    def close(self) -> None:
        """Stop the child (killed when a search still runs); a later solve starts a new one."""
        if self._lock.acquire(timeout=0.1):
            try:
                self._stop(kill=False)
            finally:
                self._lock.release()
        else:  # a search runs: its process goes now, and the waiting call reports it died
            process = self._process
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()


# ------------------------------------------------------------------------------- the child


def _read_requests(
    connection: Connection, requests: queue.Queue[tuple[Any, ...]], cancel: threading.Event
) -> None:
    """Queue each solve request, set ``cancel`` on a cancel; exit when the parent is gone."""
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            os._exit(0)  # the dashboard closed its end (or died): nothing left to do
        if message[0] == "cancel":
            cancel.set()
        else:
            requests.put(message)


def _answer(problem: PlanningProblem, options: SearchOptions, out: Connection) -> None:
    from planner.make_plan import make_plan

    def progress(done: int, total: int) -> None:
        out.send(("progress", done, total))

    try:
        plan = make_plan(problem, options, progress)
    except PlannerError as exc:
        out.send(("error", exc))
        return
    except Exception as exc:  # reported to the dashboard, which shows it
        out.send(("error", SolverProcessError(f"the search failed: {exc!r}")))
        return
    out.send(("plan", plan.to_json()))


def main() -> None:
    """The child: answer solve requests from stdin on stdout until stdin closes."""
    out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # HiGHS and anything else that prints cannot corrupt the replies
    requests: queue.Queue[tuple[Any, ...]] = queue.Queue()
    cancel = threading.Event()
    reader = threading.Thread(
        target=_read_requests, args=(Connection(0, writable=False), requests, cancel), daemon=True
    )
    reader.start()
    while True:
        _kind, problem, options = requests.get()
        cancel.clear()
        _answer(problem, replace(options, cancel=cancel), out)


if __name__ == "__main__":
    main()
