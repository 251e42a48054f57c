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
import itertools
import threading
import time
from collections.abc import Iterator


class OverBudget(BaseException):
    """Raised inside the thread whose budget ran out. A BaseException, so that no
    `except Exception` in the code being run (Jinja's, a template's filters) swallows it."""


class _Watchdog:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._active: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._fired: dict[int, int] = {}  # token -> thread id, budget ran out
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float) -> int:
        with self._lock:
            token = next(self._tokens)
            self._active[token] = (time.monotonic() + seconds, threading.get_ident())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="hydra-budget")
                self._thread.start()
            self._lock.notify()
            return token

    def unwatch(self, token: int) -> bool:
        """True if the budget ran out; an OverBudget not yet delivered is withdrawn, so it
        cannot land in the caller's later code."""
        with self._lock:
            self._active.pop(token, None)
            thread_id = self._fired.pop(token, None)
            if thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
            return thread_id is not None

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for token, (deadline, thread_id) in list(self._active.items()):
                    if deadline <= now:
                        del self._active[token]
                        self._fired[token] = thread_id
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(thread_id), ctypes.py_object(OverBudget)
                        )
                pending = [deadline for deadline, _ in self._active.values()]
                self._lock.wait(timeout=max(0.0, min(pending) - now) if pending else None)


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Runs the block for at most `seconds` (plus the time to reach the next bytecode);
    raises OverBudget when it ran out."""
    token = _WATCHDOG.watch(seconds)
    ran_out = False
    try:
        yield
    except OverBudget:
        ran_out = True
    finally:
        ran_out = _WATCHDOG.unwatch(token) or ran_out
    if ran_out:
        raise OverBudget
