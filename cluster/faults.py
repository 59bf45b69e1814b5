"""Who failed: the script, or the cluster under it.

Ray tells system failures from application errors (it retries the first, and the second
only if asked); the batch job does the same with its scripts' attempts. A script's own
failure (its exception, a hang charged to it, a decode error) uses up one of its
`--max-attempts`. A failure of the cluster under it never does: a memory shard
unreachable or restarted with its state lost, storage down past its retries, an object
lost, a node lost with the replica on it. Those wait for the cluster with backoff and
retry the script (from its latest checkpoint), bounded by `--infra-timeout`. A replica
process that dies on a live node may be the script's own doing (a poison script that
crashes or exhausts its process): those count against `--max-replica-deaths`.

The replica raises `ClusterFault`s for what it knows to be the cluster's (cluster/
memory_service.py, cluster/storage.py); the scheduler classifies the rest with `kind`.
"""
from __future__ import annotations

import ray

SCRIPT, CLUSTER, DEATH, NOT_STARTED = "script", "cluster", "replica death", "not started"


class ClusterFault(Exception):
    """A failure of the cluster under a script: never charged to the script."""


class ShardUnavailable(ClusterFault, RuntimeError):
    """A memory shard did not answer (its node lost, or restarting)."""


class StorageUnavailable(ClusterFault, OSError):
    """Object storage kept failing past the retries (an outage)."""


def cause_of(err: BaseException) -> BaseException:
    """The exception a remote call raised, out of Ray's wrapper."""
    return getattr(err, "cause", None) or err


def kind(err: BaseException) -> str:
    """SCRIPT or CLUSTER for a failed call that reached the replica (a RayTaskError, or
    an error of Ray's own); a replica's death is the pool's to classify (DEATH or CLUSTER)."""
    cause = cause_of(err)
    if isinstance(cause, ClusterFault):
        return CLUSTER
    # Ray's own failures inside the render: an actor it called, an object, the system
    if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                          ray.exceptions.RaySystemError, ray.exceptions.OwnerDiedError)):
        return CLUSTER
    return SCRIPT
