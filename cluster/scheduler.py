"""Bounded in-flight scheduling of scripts over replicas, with capped retries.

At most `per_replica` calls wait on each replica (one rendering, the next queued in
its mailbox so the GPU never idles between scripts); the source is pulled only
when a slot frees, so a manifest of millions is never held in memory. The loop
blocks in `ray.wait`: no polling, no sleeps. A failed call (replica died, memory
shard lost the video's state, any error) is retried on another replica when one
has room, up to `max_attempts` in all; a replica that died waits out its restart
(Ray restarts it) before it gets work again.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ray


@dataclass
class Task:
    video_id: str
    script: dict
    line: int
    attempts: int = 0
    tried: set = field(default_factory=set)
    errors: list = field(default_factory=list)


def _reason(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


class Scheduler:
    """`call(replica, task)` submits a task; `probe(replica)` returns a ref that resolves
    once a replica Ray is restarting serves again (it fails if the replica is gone for
    good). A replica whose call failed with an actor error gets no work until then:
    otherwise every retry would hit it while it restarts and use up its attempts at once."""

    def __init__(self, replicas: list, call: Callable, probe: Callable | None = None,
                 per_replica: int = 2, max_attempts: int = 3):
        self.replicas = replicas
        self.call = call
        self.probe = probe
        self.per_replica = per_replica
        self.max_attempts = max_attempts
        self.load = [0] * len(replicas)
        self.up = [True] * len(replicas)
        self.probes: dict = {}  # probe ref -> replica index, for replicas being restarted

    def _pick(self, task: Task) -> int | None:
        free = [i for i, n in enumerate(self.load) if n < self.per_replica and self.up[i]]
        if not free:
            return None
        # another replica than the ones that failed this task, then the least loaded
        return min(free, key=lambda i: (i in task.tried, self.load[i], i))

    def _failed(self, slot: int, err: Exception) -> None:
        if self.probe is not None and self.up[slot] and isinstance(err, ray.exceptions.RayActorError):
            self.up[slot] = False
            self.probes[self.probe(self.replicas[slot])] = slot

    def run(self, tasks: Iterator[Task]) -> Iterator[tuple[Task, object | None]]:
        """Yields (task, result) for successes and (task, None) for tasks out of attempts
        or left without any live replica (their reasons in task.errors)."""
        pending: dict = {}
        retry: deque[Task] = deque()
        exhausted = False
        while True:
            while True:
                if not retry and exhausted:
                    break
                task = retry[0] if retry else next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                slot = self._pick(task)
                if slot is None:
                    if not retry:
                        retry.append(task)  # pulled from the source: keep it for the next free slot
                    break
                if retry:
                    retry.popleft()
                task.attempts += 1
                task.tried.add(slot)
                pending[self.call(self.replicas[slot], task)] = (task, slot)
                self.load[slot] += 1
            if not pending and not self.probes:
                if not retry and exhausted:
                    return
                # Every replica is gone for good: fail what is left rather than lose it.
                for task in [*retry, *tasks]:
                    task.errors.append("no live replica left to render it")
                    yield task, None
                return
            [ref], _ = ray.wait([*pending, *self.probes], num_returns=1)
            if ref in self.probes:
                slot = self.probes.pop(ref)
                try:
                    ray.get(ref)
                    self.up[slot] = True
                except ray.exceptions.RayError:
                    pass  # gone for good: it stays out
                continue
            task, slot = pending.pop(ref)
            self.load[slot] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                task.errors.append(_reason(err))
                self._failed(slot, err)
                if task.attempts < self.max_attempts:
                    retry.append(task)
                else:
                    yield task, None
                continue
            yield task, result
