"""Bounded in-flight scheduling of scripts over an elastic pool of replicas, with retries
charged to whoever failed (cluster/faults.py).

At most `per_replica` calls run on each replica at once (a pipelined replica renders
two: one generates while the one before it finishes, cluster/replica.py); the source is
pulled only when a replica has room, so a manifest of millions is never held in memory.
The loop blocks in one `ray.wait` over the calls, the probes of replicas joining or
restarting (cluster/pool.py) and the stall watchdog's status polls (cluster/watchdog.py),
with a timeout for the next poll or retry due: no sleeps.

A failed call is retried on another replica when one has room. What it costs depends on
who failed:

- the script's own failure (its exception, a stall charged to it) uses up one of
  `max_attempts`;
- a replica that died while generating it (the pool charges the script holding the
  GPU turn) is held until the pool knows why: its node lost (the cluster's: not charged)
  or its process died on a live node (one of `max_replica_deaths`, a larger budget: a
  poison script that kills its replica every time still ends);
- a failure of the cluster under it (a shard unreachable or restarted, storage down, an
  object lost) is never charged: the script waits with backoff and is retried, from its
  latest checkpoint; if it is still failing so after `infra_timeout_s`, `InfraTimeout`
  ends the run with the reason;
- a call that never started, or was only finishing behind the one generating, is not
  charged at all.

The scheduler owns its calls in flight and nothing else: the replicas' states are the
pool's, which it tells of each event. When work waits and no replica can ever take it
(every one failed to start, or none came up within `start_timeout_s`), the scripts
waiting for a retry come back failed and `NoReplica` ends the run: the rest of the source
is left untouched for a re-run, rather than reported a million times over.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray

from .faults import CLUSTER, DEATH, kind
from .pool import UP, Charge, Replica, ReplicaPool
from .watchdog import StallWatchdog


@dataclass
class Task:
    video_id: str
    script: dict
    line: int
    calls: int = 0  # renders submitted
    attempts: int = 0  # the script's own failures (max_attempts)
    deaths: int = 0  # its replica's process died while generating it (max_replica_deaths)
    faults: list = field(default_factory=list)  # failures of the cluster under it: never charged
    tried: set = field(default_factory=set)
    errors: list = field(default_factory=list)  # why it failed, charged or not
    waiting_since: float | None = None  # when the cluster first failed under it

    def history(self) -> dict:
        """What its renders cost so far, for its record (and errors.jsonl)."""
        return {"calls": self.calls, "attempts": self.attempts, "replica_deaths": self.deaths,
                "cluster_faults": len(self.faults), "cluster_reasons": self.faults[-5:]}


class _Iterated:
    """An iterator of tasks as a source: exhausted when it ends."""

    def __init__(self, tasks: Iterator[Task]):
        self.tasks, self.exhausted = tasks, False

    def next(self) -> Task | None:
        task = next(self.tasks, None)
        self.exhausted = task is None
        return task


class NoReplica(RuntimeError):
    """Work is waiting and no replica is up or can come up: the run cannot go on."""


class InfraTimeout(RuntimeError):
    """The cluster kept failing under a script for longer than the job waits."""


def _reason(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Scheduler:
    """`call(actor, task)` submits a task to a replica actor and returns its ref."""

    def __init__(self, pool: ReplicaPool, call: Callable, per_replica: int = 2, max_attempts: int = 3,
                 watchdog: StallWatchdog | None = None, start_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic, max_replica_deaths: int = 5,
                 infra_timeout_s: float = 3600.0, backoff_s: float = 1.0):
        self.pool, self.call = pool, call
        self.per_replica, self.max_attempts, self.max_deaths = per_replica, max_attempts, max_replica_deaths
        self.watchdog, self.start_timeout_s, self.clock = watchdog, start_timeout_s, clock
        self.infra_timeout_s, self.backoff_s = infra_timeout_s, backoff_s
        self.pending: dict = {}  # call ref -> (task, replica)
        self.on: dict[Replica, list] = collections.defaultdict(list)  # replica -> its call refs, oldest first
        self.retry: deque[Task] = deque()  # ready to go again
        self.later: list = []  # heap of (not before, n, task): cluster faults, backing off
        self.held: list[tuple[Task, Charge]] = []  # charged with a replica death the pool has not judged yet
        self._n = itertools.count()

    def _free(self) -> list[Replica]:
        return [r for r in self.pool.up() if len(self.on[r]) < self.per_replica]

    def _videos(self, replica: Replica) -> list[str]:
        return [self.pending[ref][0].video_id for ref in self.on[replica]]

    def _submit(self, task: Task, free: list[Replica]) -> None:
        # another replica than the ones that failed this task, then the least loaded
        replica = min(free, key=lambda r: (r.index in task.tried, len(self.on[r]), r.index))
        task.calls += 1
        task.tried.add(replica.index)
        ref = self.call(replica.actor, task)
        self.pending[ref] = (task, replica)
        if not self.on[replica] and self.watchdog is not None:
            self.watchdog.progressed(replica)  # its stall clock starts with the work
        self.on[replica].append(ref)

    def run(self, tasks) -> Iterator[tuple[Task, object | None]]:
        """Yields (task, result) for successes and (task, None) for tasks that could not
        be rendered (their reasons in task.errors); raises NoReplica or InfraTimeout (see
        above). `tasks`: an iterator, or a source whose `next()` may have nothing yet (None)
        until a task in flight ends, and which says when it is `exhausted` (jobs/stories.py)."""
        source = tasks if hasattr(tasks, "exhausted") else _Iterated(iter(tasks))
        starved_since = None  # since when work has waited with no replica up
        while True:
            while self.later and self.later[0][0] <= self.clock():
                self.retry.append(heapq.heappop(self.later)[2])
            yield from self._judge_held()
            while (self.retry or not source.exhausted) and (free := self._free()):
                task = self.retry.popleft() if self.retry else source.next()
                if task is None:
                    break
                self._submit(task, free)
            waiting = bool(self.retry or self.later or self.held) or not source.exhausted
            if not waiting:
                if not self.pending:
                    return
                self.pool.retire_unneeded({r for r, refs in self.on.items() if refs})
            starved_since = (starved_since or self.clock()) if waiting and not self.pool.up() else None
            reason = self._hopeless(starved_since)
            if reason is not None:
                for task in [*self.retry, *(t for _, _, t in self.later), *(t for t, _ in self.held)]:
                    task.errors.append(reason)
                    yield task, None
                raise NoReplica(reason)

            probes = self.pool.probes()
            polls = self.watchdog.polls if self.watchdog is not None else {}
            refs = [*self.pending, *probes, *polls]
            ready = ray.wait(refs, num_returns=1, timeout=self._timeout(starved_since))[0] if refs else \
                self._idle(starved_since)
            for ref in ready:
                if ref in self.pending:
                    yield from self._finished(ref)
                elif ref in probes:
                    self.pool.on_probe(probes[ref])
                else:
                    self.watchdog.on_status(ref)
            if self.watchdog is not None:
                for replica, why in self.watchdog.check([r for r in self.pool.up() if self.on[r]]):
                    self.pool.restart(replica, why, self._videos(replica))

    def _idle(self, starved_since: float | None) -> list:
        """Nothing to wait on but the clock (a retry backing off, a death being judged)."""
        timeout = self._timeout(starved_since)
        time.sleep(min(timeout if timeout is not None else 1.0, 1.0))
        return []

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
        now = self.clock()
        timeouts = []
        if self.watchdog is not None and any(self.on[r] for r in self.pool.up()):
            timeouts.append(self.watchdog.wait_s())
        if starved_since is not None and self.start_timeout_s is not None:
            timeouts.append(max(0.0, starved_since + self.start_timeout_s - now) + 0.01)
        if self.later:
            timeouts.append(max(0.0, self.later[0][0] - now) + 0.01)
        if self.held:
            timeouts.append(1.0)  # the pool's verdict may come from the clock or the GCS
        return min(timeouts) if timeouts else None

    def _drop(self, ref, replica: Replica) -> None:
        del self.pending[ref]
        self.on[replica].remove(ref)

    def _finished(self, ref) -> Iterator[tuple[Task, object | None]]:
        task, replica = self.pending[ref]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayActorError):
                self.pool.lost(replica, err, self._videos(replica))  # while this call is still in flight
            self._drop(ref, replica)
            if self.watchdog is not None and replica.state != UP:
                self.watchdog.forget(replica)
            self.pool.settled(replica, len(self.on[replica]))
            if not isinstance(err, ray.exceptions.RayActorError):
                yield from self._charge(task, kind(err), _reason(err))
            elif (charge := self.pool.charged(replica, task.video_id)) is None:
                self.retry.append(task)  # it never started, or was only finishing: nothing to charge
            elif charge.reason is not None:  # restarted by the stall watchdog: a hang is the script's
                yield from self._charge(task, "script", charge.reason)
            else:
                self.held.append((task, charge))  # a death: the node lost, or the process on a live one?
            return
        self._drop(ref, replica)
        self.pool.settled(replica, len(self.on[replica]))
        if self.watchdog is not None:
            self.watchdog.progressed(replica)
        yield task, result

    def _judge_held(self) -> Iterator[tuple[Task, object | None]]:
        for task, charge in list(self.held):
            verdict = self.pool.verdict(charge)
            if verdict is not None:
                self.held.remove((task, charge))
                yield from self._charge(task, verdict, charge.describe(verdict))

    def _charge(self, task: Task, who: str, reason: str) -> Iterator[tuple[Task, object | None]]:
        """Account a failure to whoever failed; retry the task or give it up."""
        task.errors.append(reason)
        if who == CLUSTER:
            now = self.clock()
            task.faults.append(reason)
            task.waiting_since = task.waiting_since or now
            if now - task.waiting_since > self.infra_timeout_s:
                raise InfraTimeout(f"the cluster kept failing under {task.video_id!r} for "
                                   f"{now - task.waiting_since:.0f} s (limit {self.infra_timeout_s:.0f} s): {reason}")
            delay = min(self.backoff_s * 2 ** (len(task.faults) - 1), 30.0)
            heapq.heappush(self.later, (now + delay, next(self._n), task))
            return
        if who == DEATH:
            task.deaths += 1
            out = task.deaths >= self.max_deaths
        else:
            task.attempts += 1
            out = task.attempts >= self.max_attempts
        if out:
            yield task, None
        else:
            self.retry.append(task)
