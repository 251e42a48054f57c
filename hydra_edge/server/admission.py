"""How many requests run and wait: up to `slots` generate at once, `queue` more wait for a slot,
and the next is refused at once (429 with Retry-After) instead of piling up without bound.

Everything here runs on the event loop's thread; a worker thread frees its slot through
loop.call_soon_threadsafe, so no lock is needed.
"""

from __future__ import annotations

import asyncio


class Admission:
    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        self._free = asyncio.Semaphore(slots)
        self.admitted = 0  # requests between admit() and the end of their response
        self.running = 0  # requests holding a slot
        self.waiting = 0  # requests waiting for one (the queue depth)

    def admit(self) -> Ticket | None:
        """A ticket, or None when `slots` run and `queue` wait already."""
        if self.admitted >= self.slots + self.queue:
            return None
        self.admitted += 1
        return Ticket(self)


class Ticket:
    """One admitted request. It holds a slot from take_slot(), taken before the request is prepared
    (routed, rendered, tokenized), until free_slot(): the generation's worker thread frees it when
    it ends (a disconnect ends it after the current token); a proxied request frees it when its
    response is closed."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.has_slot = self.closed = self.worker_owns_slot = False

    async def take_slot(self) -> bool:
        """True once the slot is held (the request waits in the queue until then)."""
        self.admission.waiting += 1
        try:
            await self.admission._free.acquire()
        finally:
            self.admission.waiting -= 1
        self.has_slot = True
        self.admission.running += 1
        return True

    def free_slot(self) -> None:
        if self.has_slot:
            self.has_slot = False
            self.admission.running -= 1
            self.admission._free.release()

    def close(self) -> None:
        """The response is over (sent, failed or abandoned by the client)."""
        if not self.closed:
            self.closed = True
            self.admission.admitted -= 1
            if not self.worker_owns_slot:
                self.free_slot()
