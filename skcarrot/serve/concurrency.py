"""How much of a server one key's requests hold at once, and which requests skip the thread pool.

:class:`KeySlots` bounds one key's requests at work (and waiting) in a worker process;
:class:`InlinePolicy` decides which small charged requests run in the event loop's own thread.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .errors import ApiError

__all__ = ["KeySlots", "InlinePolicy", "per_worker_slots"]


def per_worker_slots(per_key: int, workers: int) -> int:
    """Each worker's share of a key's ``per_key`` slots, so that ``workers`` processes hold at most ``per_key``.

    Every worker keeps at least one slot, so a key holds at most ``max(per_key, workers)``
    slots across all workers.

    Examples
    --------
    >>> from skcarrot.serve.concurrency import per_worker_slots
    >>> per_worker_slots(4, 1), per_worker_slots(4, 2), per_worker_slots(4, 3), per_worker_slots(4, 8)
    (4, 2, 1, 1)
    """
    return max(1, int(per_key) // max(1, int(workers)))


@dataclass
class _Slots:
    loop: asyncio.AbstractEventLoop
    free: asyncio.Semaphore
    active: int = 0


class KeySlots:
    """At most ``per_key`` requests of one key at work at once (in this process); the rest wait their turn.

    A key that already has ``max_waiting`` requests waiting is refused (429): one
    key, however many requests it sends, holds at most ``per_key`` of the
    server's threads, and its queue is bounded.
    """

    def __init__(self, per_key: int = 4, max_waiting: int | None = None) -> None:
        self.per_key = max(1, int(per_key))
        self.max_waiting = 4 * self.per_key if max_waiting is None else int(max_waiting)
        self._keys: dict[int, _Slots] = {}

    @asynccontextmanager
    async def hold(self, key_id: int):
        loop = asyncio.get_running_loop()
        slots = self._keys.get(key_id)
        if slots is None or slots.loop is not loop:
            slots = self._keys[key_id] = _Slots(loop, asyncio.Semaphore(self.per_key))
        if slots.active - self.per_key >= self.max_waiting:
            raise ApiError(
                429,
                f"this key already has {self.per_key} requests at work and {self.max_waiting} waiting; "
                "send fewer at once",
                headers={"Retry-After": "1"},
                retry_after=1.0,
            )
        slots.active += 1
        try:
            async with slots.free:
                yield
        finally:
            slots.active -= 1
            if slots.active == 0 and self._keys.get(key_id) is slots:
                del self._keys[key_id]


class InlinePolicy:
    """Which charged requests run in the event loop's own thread instead of the thread pool.

    Handing a request to a pool thread and back wakes two threads; on a busy
    machine each wake-up can wait for a scheduler slice, milliseconds a request.
    A small request (at most one model call's worth of work, no large upload)
    runs in the loop's thread when nothing else is in flight in this process, so
    it holds up nobody but a request arriving meanwhile, and only while this
    endpoint's recent requests took at most ``max_s`` (an estimate kept per
    endpoint from every request it ran, here or in the pool; one slower request
    sends the next ones back to the pool).

    Examples
    --------
    >>> from skcarrot.serve.concurrency import InlinePolicy
    >>> policy = InlinePolicy(max_s=0.02)
    >>> policy.allows("/v1/score", in_flight=1)  # no estimate yet: the pool, which measures it
    False
    >>> policy.record("/v1/score", 0.005)
    >>> policy.allows("/v1/score", in_flight=1), policy.allows("/v1/score", in_flight=2)
    (True, False)
    >>> policy.record("/v1/score", 0.5)
    >>> policy.allows("/v1/score", in_flight=1)
    False
    """

    def __init__(self, max_s: float = 0.025) -> None:
        self.max_s = float(max_s)
        self._seconds: dict[str, float] = {}

    def allows(self, route: str, in_flight: int) -> bool:
        """Whether a small request of ``route`` runs inline, with ``in_flight`` requests (itself included) at work."""
        estimate = self._seconds.get(route)
        return in_flight <= 1 and estimate is not None and estimate <= self.max_s

    def record(self, route: str, seconds: float) -> None:
        """A request of ``route`` took ``seconds`` of work."""
        before = self._seconds.get(route)
        if before is None or seconds > self.max_s:
            self._seconds[route] = seconds
        else:
            self._seconds[route] = 0.75 * before + 0.25 * seconds
