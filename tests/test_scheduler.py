"""The scheduler against real actors that die: nothing is lost, nothing runs twice after success."""
import os

import ray

from cluster.scheduler import Scheduler, Task


@ray.remote(num_cpus=0, max_restarts=0)
class Mortal:
    """A replica that dies (for good) on the script "die"."""

    def render(self, script: str) -> str:
        if script == "die":
            os._exit(1)
        return script.upper()

    def status(self) -> dict:
        return {}


def test_replicas_that_die_for_good_leave_no_task_lost(ray_client):
    replicas = [Mortal.remote() for _ in range(2)]
    names = ["a", "b", "die", *"cdefgh"]
    tasks = (Task(n, n, i) for i, n in enumerate(names))
    scheduler = Scheduler(replicas, lambda r, t: r.render.remote(t.script), probe=lambda r: r.status.remote(),
                          per_replica=1, max_attempts=2)
    results = list(scheduler.run(tasks))
    assert sorted(t.video_id for t, _ in results) == sorted(names), "each task comes back exactly once"
    done = {t.video_id: r for t, r in results if r is not None}
    assert all(r == n.upper() for n, r in done.items()) and {"a", "b"} <= set(done)
    failed = {t.video_id: t for t, r in results if r is None}
    assert failed["die"].attempts == 2 and len(failed["die"].errors) == 2, "retried on the other replica"
    assert failed["die"].tried == {0, 1}
    for name, task in failed.items():
        if name != "die":
            assert task.errors[-1] == "no live replica left to render it"
    assert scheduler.up == [False, False]
