"""The scheduler and the replica pool against real actors that die, never start, or hang:
nothing is lost, nothing runs twice after success, nothing waits for ever."""
import os
import time

import pytest
import ray

from cluster.pool import GONE, ReplicaPool
from cluster.replica import post_turn, turn_holder
from cluster.scheduler import NoReplica, Scheduler, Task
from cluster.watchdog import StallWatchdog


@ray.remote(num_cpus=0, max_restarts=0)
class Mortal:
    """A replica that dies (for good) on the script "die" and hangs on "hang"."""

    def __init__(self, broken: bool = False):
        if broken:
            raise RuntimeError("NoCredentialsError: Unable to locate credentials")

    def render(self, script: str) -> str:
        if script == "die":
            os._exit(1)
        if script == "hang":
            time.sleep(3600)
        return script.upper()

    def status(self) -> dict:
        return {}


def probe(actor):
    return actor.status.options(max_task_retries=-1).remote()


def schedule(names, pool, **kwargs):
    tasks = (Task(n, n, i) for i, n in enumerate(names))
    scheduler = Scheduler(pool, lambda a, t: a.render.remote(t.script), **kwargs)
    return list(scheduler.run(tasks))


def test_replicas_that_die_for_good_are_replaced_and_no_task_is_lost(ray_client):
    """"die" kills its replica's process (on a live node): a replica death, charged to the
    script's own budget of deaths, not to its attempts."""
    pool = ReplicaPool(lambda i: Mortal.remote(), probe, size=2, max_starts=3)
    names = ["a", "b", "die", *"cdefgh"]
    results = schedule(names, pool, per_replica=1, max_attempts=1, max_replica_deaths=2)
    assert sorted(t.video_id for t, _ in results) == sorted(names), "each task comes back exactly once"
    done = {t.video_id: r for t, r in results if r is not None}
    assert done == {n: n.upper() for n in names if n != "die"}
    [(failed, _)] = [(t, r) for t, r in results if r is None]
    assert failed.video_id == "die" and (failed.deaths, failed.attempts, failed.calls) == (2, 0, 2)
    assert len(failed.errors) == 2 and all("died on a live node" in e for e in failed.errors), failed.errors
    assert failed.tried == {0, 1}, "retried on the other replica"
    assert sum(r.starts for r in pool.replicas) == 4, "each death replaced by a fresh actor"
    pool.close()


def test_queued_scripts_keep_their_attempts_when_the_replica_dies(ray_client):
    """One replica, two in flight: "die" kills it while "a" waits behind it in its mailbox.
    "a" never started, so its one allowed attempt is not used up."""
    pool = ReplicaPool(lambda i: Mortal.remote(), probe, size=1, max_starts=2)
    results = dict((t.video_id, (t, r)) for t, r in schedule(["die", "a"], pool, per_replica=2, max_attempts=1,
                                                              max_replica_deaths=1))
    assert results["a"][1] == "A" and results["a"][0].attempts == 0 and results["a"][0].calls == 2
    assert results["die"][1] is None and results["die"][0].deaths == 1
    pool.close()


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=2)
class Pipelined:
    """Two calls at once, as a pipelined replica: "slow" finishes (no GPU turn) while "die"
    takes the GPU turn, posts it as GeneratorReplica does, and kills the process."""

    def render(self, script: str) -> str:
        if script == "die":
            time.sleep(0.5)  # "slow", submitted first, is running by now
            post_turn(ray.get_runtime_context().get_actor_id(), script)
            os._exit(1)
        time.sleep(2 if script == "slow" else 0)
        return script.upper()

    def status(self) -> dict:
        return {}


def test_a_death_is_charged_to_the_script_generating_not_the_one_finishing(ray_client):
    """One pipelined replica, both calls started: "slow" (submitted first) was finishing when
    "die", holding the GPU turn, killed the process. Only "die" uses up its one attempt;
    charging the oldest call would fail "slow" instead."""
    pool = ReplicaPool(lambda i: Pipelined.remote(), probe, size=1, max_starts=2, generating=turn_holder)
    tasks = (Task(n, n, i) for i, n in enumerate(["slow", "die"]))
    scheduler = Scheduler(pool, lambda a, t: a.render.remote(t.script), per_replica=2, max_attempts=1,
                          max_replica_deaths=1)
    results = {t.video_id: (t, r) for t, r in scheduler.run(tasks)}
    assert results["slow"][1] == "SLOW" and (results["slow"][0].attempts, results["slow"][0].deaths) == (0, 0)
    assert results["die"][1] is None and results["die"][0].deaths == 1 and len(results["die"][0].errors) == 1
    pool.close()


def test_replicas_that_cannot_start_end_the_run_with_their_reason(ray_client):
    pool = ReplicaPool(lambda i: Mortal.remote(broken=True), probe, size=2)
    with pytest.raises(NoReplica, match="NoCredentialsError: Unable to locate credentials"):
        schedule(["a", "b"], pool)
    assert [r.state for r in pool.replicas] == [GONE, GONE]
    assert all(r.starts == 1 for r in pool.replicas), "a constructor that fails is not retried for ever"


def test_no_replica_up_within_the_start_timeout_ends_the_run(ray_client):
    """Replicas that need a resource no node has stay pending: the run ends, it does not hang."""
    pool = ReplicaPool(lambda i: Mortal.options(resources={"no_such_gpu": 1}).remote(), probe, size=1)
    t0 = time.monotonic()
    with pytest.raises(NoReplica, match="no replica came up .* within 2 s"):
        schedule(["a"], pool, start_timeout_s=2)
    assert time.monotonic() - t0 < 60
    pool.close()


def test_a_stalled_replica_is_restarted_and_its_script_retried(ray_client):
    """"hang" never returns: the watchdog (limit 1 s) kills the replica; the pool replaces it
    (max_restarts=0 here) and "hang" uses up its attempts; the others are rendered."""
    pool = ReplicaPool(lambda i: Mortal.remote(), probe, size=2, max_starts=4)
    watchdog = StallWatchdog(lambda r: r.actor.status.remote(), limit_s=1.0)
    results = schedule(["hang", *"abcd"], pool, per_replica=1, max_attempts=2, watchdog=watchdog)
    done = {t.video_id: r for t, r in results if r is not None}
    assert done == {n: n.upper() for n in "abcd"}
    [(hung, _)] = [(t, r) for t, r in results if r is None]
    assert hung.video_id == "hang" and hung.attempts == 2 and hung.deaths == 0, "a stall is the script's failure"
    assert all(e.startswith("stalled: no progress for") for e in hung.errors), hung.errors
    pool.close()
