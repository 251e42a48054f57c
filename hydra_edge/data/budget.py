"""A time budget for Python code that may never end: rendering a chat template.

A chat template is code that came with a model or an adapter, and Jinja's sandbox bounds what it
may touch, not how long it runs: two nested `range(100000)` loops render for hours, and Jinja
offers no hook inside a loop over a plain list. So the budget is kept from outside: a watchdog
thread raises `OverBudget` inside the rendering thread once its time is up
(`PyThreadState_SetAsyncExc`, which lands at the next bytecode of that thread, wherever it is).
Jinja templates compile to Python bytecode, so every loop of one is interrupted; a single C call
(a huge string repeated) is not, which is why callers also bound what a render returns.

One watchdog thread serves every rendering thread (the server renders on several workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import itertools
import queue
import threading
import time


class OverBudget(BaseException):
    """Raised inside the thread whose budget ran out. A BaseException, so that no
    `except Exception` in the code being run (Jinja's, a template's filters) swallows it."""


class _Watchdog:
    """Deadlines arrive on a queue; at each one the watchdog takes that render's guard (a lock
    nobody releases) and, if it got it, raises OverBudget in the rendering thread. A render that
    ends takes the guard first, so the watchdog can no longer fire for it. The rendering thread
    never holds a lock the watchdog needs: an exception landing anywhere in it can leave nothing
    locked (a shared lock taken there could be left held for good)."""

    def __init__(self) -> None:
        self._deadlines: queue.SimpleQueue = queue.SimpleQueue()  # (deadline, thread id, guard)
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float) -> threading.Lock:
        with self._started:  # taken before this deadline exists: no OverBudget can land here
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="hydra-budget")
                self._thread.start()
        guard = threading.Lock()
        self._deadlines.put((time.monotonic() + seconds, threading.get_ident(), guard))
        return guard

    def _run(self) -> None:
        pending: list[tuple[float, int, int, threading.Lock]] = []  # a heap by deadline
        order = itertools.count()
        while True:
            timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
            try:
                deadline, thread_id, guard = self._deadlines.get(timeout=timeout)
                heapq.heappush(pending, (deadline, next(order), thread_id, guard))
            except queue.Empty:
                pass
            while pending and pending[0][0] <= time.monotonic():
                _, _, thread_id, guard = heapq.heappop(pending)
                if guard.acquire(blocking=False):  # the render has not ended: stop it
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(OverBudget))


_WATCHDOG = _Watchdog()


class time_budget:  # noqa: N801 - used like a function: `with time_budget(2.0):`
    """Runs the block for at most `seconds` (plus the time to reach the next bytecode); raises
    OverBudget when it ran out, and never lets an OverBudget land after the block's `with`
    statement. A class, not a generator: an exception landing in contextlib's frames would
    leave a generator suspended, to raise again when it is collected."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        self.guard = _WATCHDOG.watch(self.seconds)

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None and issubclass(kind, OverBudget):
            return False  # it landed in the block: let it through
        if self.guard.acquire(blocking=False):
            return False  # ended in time: the watchdog can no longer fire for it
        # The watchdog took the guard: its OverBudget is on its way. Take it here, not in the
        # caller's later code.
        with contextlib.suppress(OverBudget):
            for _ in range(1000):
                time.sleep(0.001)
        raise OverBudget
