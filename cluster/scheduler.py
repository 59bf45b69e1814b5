"""Bounded in-flight scheduling of scripts over an elastic pool of replicas, with capped retries.

At most `per_replica` calls wait on each replica (one rendering, the next queued in
its mailbox so the GPU never idles between scripts); the source is pulled only
when a replica has room, so a manifest of millions is never held in memory. The
loop blocks in one `ray.wait` over the calls, the probes of replicas joining or
restarting (cluster/pool.py) and the stall watchdog's status polls
(cluster/watchdog.py), with a timeout for the next poll: no sleeps.

A failed call is retried on another replica when one has room, up to
`max_attempts` in all. When a replica dies, only the call it was running uses up an
attempt (the script holding its GPU turn, as `generating` tells, else its oldest call):
the other was queued behind it, or was finishing a script it had generated already. Scripts out
of attempts come back with their reasons. When work waits and no replica can
ever take it (every one failed to start, or none came up within
`start_timeout_s`), the scripts waiting for a retry come back failed and
`NoReplica` ends the run: the rest of the source is left untouched for a re-run,
rather than reported a million times over.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray

from .pool import UP, Replica, ReplicaPool
from .watchdog import StallWatchdog


@dataclass
class Task:
    video_id: str
    script: dict
    line: int
    attempts: int = 0
    tried: set = field(default_factory=set)
    errors: list = field(default_factory=list)


class NoReplica(RuntimeError):
    """Work is waiting and no replica is up or can come up: the run cannot go on."""


def _reason(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Scheduler:
    """`call(actor, task)` submits a task to a replica actor and returns its ref;
    `generating(actor)` names the video a replica was generating (cluster/replica.py
    `turn_holder`), also after its death."""

    def __init__(self, pool: ReplicaPool, call: Callable, per_replica: int = 2, max_attempts: int = 3,
                 watchdog: StallWatchdog | None = None, start_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, generating: Callable | None = None):
        self.pool, self.call, self.generating = pool, call, generating
        self.per_replica, self.max_attempts = per_replica, max_attempts
        self.watchdog, self.start_timeout_s, self.clock = watchdog, start_timeout_s, clock
        self.pending: dict = {}  # call ref -> (task, replica)

    def _free(self) -> list[Replica]:
        return [r for r in self.pool.up() if r.load < self.per_replica]

    def _submit(self, task: Task, free: list[Replica]) -> None:
        # another replica than the ones that failed this task, then the least loaded
        replica = min(free, key=lambda r: (r.index in task.tried, r.load, r.index))
        task.attempts += 1
        task.tried.add(replica.index)
        ref = self.call(replica.actor, task)
        self.pending[ref] = (task, replica)
        if replica.load == 0 and self.watchdog is not None:
            self.watchdog.progressed(replica)  # its stall clock starts with the work
        replica.load += 1
        replica.inflight.append(ref)

    def run(self, tasks: Iterator[Task]) -> Iterator[tuple[Task, object | None]]:
        """Yields (task, result) for successes and (task, None) for tasks that could not
        be rendered (their reasons in task.errors); raises NoReplica (see above)."""
        retry: deque[Task] = deque()
        exhausted = False
        starved_since = None  # since when work has waited with no replica up
        while True:
            while (retry or not exhausted) and (free := self._free()):
                task = retry.popleft() if retry else next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                self._submit(task, free)
            waiting = bool(retry) or not exhausted
            if not waiting:
                if not self.pending:
                    return
                self.pool.retire_unneeded()
            starved_since = (starved_since or self.clock()) if waiting and not self.pool.up() else None
            reason = self._hopeless(starved_since)
            if reason is not None:
                for task in retry:
                    task.errors.append(reason)
                    yield task, None
                raise NoReplica(reason)

            probes = self.pool.probes()
            polls = self.watchdog.polls if self.watchdog is not None else {}
            refs = [*self.pending, *probes, *polls]
            ready, _ = ray.wait(refs, num_returns=1, timeout=self._timeout(starved_since))
            for ref in ready:
                if ref in self.pending:
                    yield from self._finished(ref, retry)
                elif ref in probes:
                    self.pool.on_probe(probes[ref])
                else:
                    self.watchdog.on_status(ref)
            if self.watchdog is not None:
                for replica, why in self.watchdog.check([r for r in self.pool.up() if r.load]):
                    self.pool.restart(replica, why, self._victim(replica))

    def _hopeless(self, starved_since: float | None) -> str | None:
        """Why the waiting work can never be rendered, if it cannot."""
        if starved_since is None:
            return None
        if not self.pool.alive():
            return self.pool.why_none()
        if self.start_timeout_s is not None and self.clock() - starved_since > self.start_timeout_s:
            return f"{self.pool.why_none()} within {self.start_timeout_s:.0f} s"
        return None

    def _timeout(self, starved_since: float | None) -> float | None:
        timeouts = []
        if self.watchdog is not None and any(r.load for r in self.pool.up()):
            timeouts.append(self.watchdog.wait_s())
        if starved_since is not None and self.start_timeout_s is not None:
            timeouts.append(max(0.0, starved_since + self.start_timeout_s - self.clock()) + 0.01)
        return min(timeouts) if timeouts else None

    def _victim(self, replica: Replica):
        """The call a replica was running when it died or stalled. A pipelined replica runs
        two (one script generating, the one before it finishing): the one generating,
        else its oldest."""
        video = self.generating(replica.actor) if self.generating is not None else None
        named = [ref for ref in replica.inflight if ref in self.pending and self.pending[ref][0].video_id == video]
        return named[0] if named else replica.inflight[0]

    def _drop(self, ref, replica: Replica) -> None:
        del self.pending[ref]
        replica.inflight.remove(ref)
        replica.load -= 1

    def _finished(self, ref, retry: deque) -> Iterator[tuple[Task, object | None]]:
        task, replica = self.pending[ref]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            self.pool.lost(replica, err, self._victim(replica))  # while this call is still in flight
            self._drop(ref, replica)
            if self.watchdog is not None and replica.state != UP:
                self.watchdog.forget(replica)
            if not isinstance(err, ray.exceptions.RayActorError):
                task.errors.append(_reason(err))
            elif ref == replica.victim:
                task.errors.append(replica.kill_reason or _reason(err))
                replica.kill_reason = None
            else:
                task.attempts -= 1  # it never started: no attempt used
            self.pool.settled(replica)
            if task.attempts < self.max_attempts:
                retry.append(task)
            else:
                yield task, None
            return
        self._drop(ref, replica)
        self.pool.settled(replica)
        if self.watchdog is not None:
            self.watchdog.progressed(replica)
        yield task, result
