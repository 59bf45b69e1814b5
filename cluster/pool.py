"""The replica pool: generator replicas that come and go while a job runs.

On an autoscaling cluster the GPU nodes may not exist when the job starts (KubeRay
worker groups that start at zero). The pool requests every replica it wants at
once: an actor waiting for resources is what makes the autoscaler add a node, and
Ray places each one as its node joins. A replica gets work from the moment it
answers, so the job starts with the first one up and spreads over the others as
they arrive.

Each replica is in one state:

- `joining`: created, waiting for a node or loading weights (a probe call is out);
- `up`: serving, may be given work;
- `restarting`: its actor died (node lost, process killed, restarted by the stall
  watchdog) and Ray is restarting it (max_restarts), possibly on another node. It is
  probed once all its calls have come back (failed): a probe sent earlier could be
  answered by the dying process;
- `gone`: dead for good (its constructor raised, or it was retired). A replica that
  died for good after having served is replaced, at most `max_starts` actors per
  slot; one whose constructor failed is not (the next would fail the same way).

When the work runs out, replicas still joining are retired (their pending demand
would make the autoscaler add nodes for nothing), and idle replicas beyond
`keep` are released so the autoscaler can take their nodes back.

The pool alone changes a replica's state, and it alone decides which script a death or
a stall is charged to (`charged`): the one holding the replica's GPU turn, which the
replica posts to the GCS as it takes the turn (cluster/replica.py `turn_holder`), else
its oldest call. And it judges why a replica died (`verdict`): its node lost (the
cluster's failure) or its process on a live node (a replica death). Both first show as
the actor unreachable; Ray declares a lost node dead only after missing its heartbeats
(about 15 s by default), so a death is judged once the node is declared dead, or once
the replica is serving again with its node alive, or after `death_grace_s`. The
scheduler keeps only its calls in flight, and tells the pool of the events it sees.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray
import yaml

from .faults import CLUSTER, DEATH

log = logging.getLogger(__name__)

JOINING, UP, RESTARTING, GONE = "joining", "up", "restarting", "gone"


@dataclass(eq=False)
class Replica:
    index: int
    actor: Any
    state: str = JOINING
    probe: Any = None  # ref that resolves once the actor serves (joining, restarting once settled)
    starts: int = 1  # actors created for this slot
    served: bool = False  # has been up at least once
    error: str | None = None  # why it is gone
    charge: "Charge | None" = None  # the script its last death or restart is charged to, until it is
    node: str | None = None  # the node it last served on
    up_since: float = 0.0  # when it last came up


@dataclass(frozen=True)
class Charge:
    """A death or stall of a replica, charged to the script it was generating. `reason`:
    the watchdog's for a stall; None for a death, to be judged (`ReplicaPool.verdict`)."""

    video_id: str
    reason: str | None
    replica: "Replica"
    node: str | None  # where it died
    at: float  # when
    error: str = ""  # what Ray said
    preempted: bool = False  # Ray says its node was drained or preempted

    def describe(self, verdict: str) -> str:
        if verdict == CLUSTER:
            return f"node {str(self.node)[:12]} lost under replica {self.replica.index} ({self.error})"
        return f"replica {self.replica.index} died on a live node while rendering it ({self.error})"


def _last_line(err: Exception) -> str:
    """The exception that ended an actor's constructor: the last line of Ray's report."""
    lines = [line.strip() for line in str(getattr(err, "error_msg", None) or err).splitlines() if line.strip()]
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", lines[-1]) if lines else type(err).__name__  # no module path


class ReplicaPool:
    """`spawn(index)` creates a replica actor; `probe(actor)` returns a ref that resolves
    when the actor serves, waiting out its creation or restart, and fails if it is dead;
    `generating(actor)` names the script holding its GPU turn, also after its death."""

    def __init__(self, spawn: Callable[[int], Any], probe: Callable[[Any], Any], size: int, keep: int = 1,
                 max_starts: int = 3, generating: Callable[[Any], str | None] | None = None,
                 death_grace_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.spawn, self._probe, self.generating = spawn, probe, generating
        self.keep, self.max_starts = keep, max_starts
        self.death_grace_s, self.clock = death_grace_s, clock
        self._nodes: tuple[float, dict] = (-1.0, {})  # (when read, node id -> alive)
        self.replicas = [self._join(Replica(i, spawn(i))) for i in range(size)]

    def _join(self, replica: Replica) -> Replica:
        replica.probe = self._probe(replica.actor)
        return replica

    # -- what the scheduler asks ------------------------------------------------------------
    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == UP]

    def probes(self) -> dict:
        return {r.probe: r for r in self.replicas if r.probe is not None}

    def alive(self) -> bool:
        return any(r.state != GONE for r in self.replicas)

    def why_none(self) -> str:
        """Why no replica is serving, for the scripts that cannot be rendered."""
        errors = sorted({r.error for r in self.replicas if r.error})
        waiting = sum(r.state in (JOINING, RESTARTING) for r in self.replicas)
        if errors:
            return "no replica could serve: " + "; ".join(errors)
        return f"no replica came up ({waiting} waiting for a node that fits them)"

    def charged(self, replica: Replica, video_id: str) -> Charge | None:
        """Whether this failed call of `video_id` pays for the replica's death or stall (once)."""
        charge = replica.charge
        if charge is None or charge.video_id != video_id:
            return None
        replica.charge = None
        return charge

    def verdict(self, charge: Charge) -> str | None:
        """Why a replica died: CLUSTER (its node is declared dead), DEATH (its process died on
        a node that is alive: it serves again there, or `death_grace_s` went by), or None
        while that is not known yet."""
        back = charge.replica.state == UP and charge.replica.up_since > charge.at
        if charge.preempted or self._alive(charge.node, fresh=back) is False:
            return CLUSTER
        if back or self.clock() - charge.at > self.death_grace_s:
            return DEATH
        return None

    def _alive(self, node: str | None, fresh: bool = False) -> bool | None:
        """Whether the GCS holds `node` alive (read at most once a second unless `fresh`);
        None if unknown."""
        if node is None:
            return None
        read, alive = self._nodes
        if fresh or self.clock() - read > 1.0:
            try:
                alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
            except Exception:  # the GCS unreachable for a moment: ask again next time
                return None
            self._nodes = (self.clock(), alive)
        return alive.get(node)

    # -- events -------------------------------------------------------------------------------
    def on_probe(self, replica: Replica) -> None:
        """The replica's probe resolved: it serves now, or it is dead for good."""
        try:
            status = ray.get(replica.probe)
        except ray.exceptions.RayError as err:
            self._dead(replica, err)
            return
        replica.state, replica.probe, replica.served, replica.up_since = UP, None, True, self.clock()
        replica.node = status.get("node", replica.node) if isinstance(status, dict) else replica.node

    def lost(self, replica: Replica, err: Exception, videos: list[str]) -> None:
        """A call failed; `videos`: the scripts of its calls still in flight, this one
        included, oldest first. An actor error means the actor died (Ray restarts it): it
        gets no work until its probe answers, and the death is charged to the script it
        was generating."""
        if replica.state == UP and isinstance(err, ray.exceptions.RayActorError):
            error = " ".join(str(err).split())[:160]
            replica.state = RESTARTING
            replica.charge = Charge(self._generating(replica, videos), None, replica, replica.node, self.clock(), error,
                                    preempted=bool(getattr(err, "preempted", False)))

    def restart(self, replica: Replica, reason: str, videos: list[str]) -> None:
        """Kill a replica that hangs; Ray restarts it and its calls fail (to be retried), the
        script it hangs on charged with `reason`."""
        replica.state = RESTARTING
        replica.charge = Charge(self._generating(replica, videos), reason, replica, replica.node, self.clock())
        ray.kill(replica.actor, no_restart=False)

    def settled(self, replica: Replica, calls_left: int) -> None:
        """One of its calls came back; once a restarting replica has none left, probe it."""
        if replica.state == RESTARTING and replica.probe is None and calls_left == 0:
            self._join(replica)

    def retire_unneeded(self, busy: set[Replica]) -> None:
        """No work is left to hand out: cancel replicas still waiting for a node, and
        release idle ones beyond `keep`."""
        for r in self.replicas:
            if r.state == JOINING:
                self._retire(r, "not needed: the work ran out before it came up")
        serving = [r for r in self.replicas if r.state in (UP, RESTARTING)]
        for r in [r for r in serving if r.state == UP and r not in busy][: max(0, len(serving) - self.keep)]:
            self._retire(r, "released: the work ran out")

    def close(self) -> None:
        for r in self.replicas:
            ray.kill(r.actor)

    # -- helpers --------------------------------------------------------------------------------
    def _generating(self, replica: Replica, videos: list[str]) -> str:
        """The script a replica was generating when it died or stalled: a pipelined replica
        runs two (one generating, the one before it finishing)."""
        video = self.generating(replica.actor) if self.generating is not None else None
        return video if video in videos else videos[0]

    def _dead(self, replica: Replica, err: Exception) -> None:
        init_failed = getattr(err, "actor_init_failed", False)
        if replica.served and not init_failed and replica.starts < self.max_starts:
            replica.actor, replica.starts, replica.state = self.spawn(replica.index), replica.starts + 1, JOINING
            self._join(replica)
            return
        replica.state, replica.probe = GONE, None
        replica.error = _last_line(err) if init_failed else f"replica {replica.index} died for good"

    def _retire(self, replica: Replica, why: str) -> None:
        log.info("replica %d %s", replica.index, why)
        ray.kill(replica.actor)
        replica.state, replica.probe = GONE, None
        replica.error = None  # not a failure


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where the cluster launcher puts its config, on the head


def capacity(resource: str) -> int:
    """How many units of `resource` the cluster has, or can have: what its nodes hold
    now, or what its autoscaler may add, whichever is more. An autoscaling cluster whose
    GPU workers start at zero has 0 GPUs now and a positive capacity."""
    return max(int(ray.cluster_resources().get(resource, 0)), _autoscaler_max(resource))


def _autoscaler_max(resource: str) -> int:
    """The autoscaler's ceiling for `resource`: from the config it publishes to the GCS
    (what Ray Train and Ray Data read; newer autoscalers publish it), else from the cluster
    launcher's config on the head node, where `ray job submit` runs the driver. 0 if
    neither is there (a fixed cluster, or an autoscaler that publishes nothing)."""
    try:
        published = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older or newer Ray without it
        published = {}
    if published.get(resource):
        return int(min(published[resource], 1 << 20))
    try:
        with open(os.path.expanduser(BOOTSTRAP_CONFIG)) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return 0
    types = [t for t in (config.get("available_node_types") or {}).values() if isinstance(t, dict)]
    per_node = [(t.get("resources") or {}).get(resource, 0) for t in types]
    total = sum(n * t.get("max_workers", config.get("max_workers", 0)) for n, t in zip(per_node, types))
    return int(min(total, config.get("max_workers", total) * max(per_node, default=0)))
