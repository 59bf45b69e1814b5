"""The stall watchdog: a replica that makes no progress for too long is restarted.

A hung CUDA call or a storage write that never returns leaves a replica alive and
silent: Ray sees nothing wrong, and the script (and the ones queued behind it)
would wait for ever. While a replica has work, the watchdog asks it for its status
every `poll_s` (answered from its own thread) and notes when the status last
changed: every chunk, encoded frame and stage moves it, and so does an answered
call. A replica whose status has not moved for `limit()` seconds, or that does not
answer at all, is reported as stalled; the scheduler restarts it and its script is
retried.

The limit is generous unless given: max(floor_s, chunk_factor x the slowest chunk
any replica has reported), so slow models on slow GPUs are not mistaken for hangs.
"""
from __future__ import annotations

import time
from typing import Callable

import ray


class StallWatchdog:
    def __init__(self, status: Callable, limit_s: float | None = None, floor_s: float = 600.0,
                 chunk_factor: float = 20.0, clock: Callable[[], float] = time.monotonic):
        self.status, self.fixed, self.floor_s, self.chunk_factor = status, limit_s, floor_s, chunk_factor
        self.clock = clock
        self.slowest_chunk_s = 0.0
        self.last: dict = {}  # replica -> (last status seen, when it last changed)
        self.polls: dict = {}  # outstanding status ref -> replica
        self.next_poll = 0.0

    def limit(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(self.floor_s, self.chunk_factor * self.slowest_chunk_s)

    def poll_s(self) -> float:
        return min(30.0, self.limit() / 4)

    def progressed(self, replica) -> None:
        """The replica got work while idle, or answered a call: its clock starts afresh."""
        self.last[replica] = (self.last.get(replica, (None, 0))[0], self.clock())

    def on_status(self, ref) -> None:
        replica = self.polls.pop(ref)
        try:
            status = ray.get(ref)
        except ray.exceptions.RayError:
            return  # it died: the scheduler hears it from its calls
        self.slowest_chunk_s = max(self.slowest_chunk_s, float(status.get("slowest_chunk_s", 0.0)))
        if status != self.last.get(replica, (None, 0))[0]:
            self.last[replica] = (status, self.clock())

    def check(self, busy: list) -> list[tuple[object, str]]:
        """Poll the busy replicas when due; returns (replica, reason) for those stalled."""
        now = self.clock()
        if now >= self.next_poll:
            self.next_poll = now + self.poll_s()
            polled = set(self.polls.values())
            for replica in busy:
                if replica not in polled:
                    self.polls[self.status(replica)] = replica
        stalled = []
        for replica in busy:
            seen, since = self.last.setdefault(replica, (None, now))
            if now - since > self.limit():
                where = f" at {seen.get('stage')} of {seen.get('video')}" if isinstance(seen, dict) else ""
                stalled.append((replica, f"stalled: no progress for {now - since:.0f} s{where} "
                                         f"(limit {self.limit():.0f} s); replica restarted"))
        return stalled

    def forget(self, replica) -> None:
        self.last.pop(replica, None)

    def wait_s(self) -> float:
        """How long the scheduler may block before the next poll is due."""
        return max(0.0, self.next_poll - self.clock())
