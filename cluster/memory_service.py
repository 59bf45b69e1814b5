"""The memory bank service: NAM ranking for every video in flight, as sharded Ray actors.

The KV tensors stay on the replica's GPU; what crosses the wire is one [L, H, D]
mean-key descriptor per recorded prototype and one per ranking query (NAM is exact
on these, memflow-algorithm.md section 3), and frame ids back. Shards are chosen by
a stable hash of the video id. A shard is an `InProcessRanker` behind an actor:
per video it keeps the descriptors and metadata of every recorded prototype and a
retrieval trace, returned when the video is released; releasing frees the video's
state, so a shard's memory does not grow with the number of videos rendered.

A shard that dies is restarted by Ray with empty state. Each render of a video opens
a session of its own (a fresh token, sent with every call): the first record of a
session starts the video afresh, so a retry never inherits the state (and retrieval
trace) of an attempt whose replica died before releasing it; a call of another session
(an attempt that died, a message Ray delivered late or twice) never changes the
video's state; a shard asked about a session it does not hold, or to rank frames it
does not hold, raises `VideoStateLost`, which fails the render attempt as a failure of
the cluster (the script is retried, never continued on a degraded memory). When a story branches, its
entries fork with it (`fork`: exported from the video's shard, adopted by the branch's),
so branches never share entries.
"""
from __future__ import annotations

import hashlib
import uuid

import ray

from memflow.memory.nam import InProcessRanker

from .faults import ClusterFault, ShardUnavailable


class VideoStateLost(ClusterFault, RuntimeError):
    """The shard holding this video's memory restarted: the render must be retried (a
    failure of the cluster, not of the script: cluster/faults.py)."""


# A call that meets the shard restarting waits for it and runs there (max_task_retries),
# rather than fail at once: every call is safe to repeat (sessions make it so).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class MemoryShard:
    def __init__(self, index: int):
        self.index = index
        self.ranker = InProcessRanker()
        self.sessions: dict[str, str] = {}  # video -> the session its state belongs to

    def _check(self, video: str, session: str) -> None:
        if self.sessions.get(video) != session or video not in self.ranker.videos:
            raise VideoStateLost(f"memory shard {self.index} holds no state for video {video!r} in this render "
                                 "(it restarted since the video began)")

    def _open(self, video: str, session: str) -> None:
        """A session's first call: the video starts afresh, once (a repeat of it is a no-op)."""
        if self.sessions.get(video) != session:
            self.ranker.release(video)
            self.ranker.videos[video] = {"frames": {}, "meta": {}, "trace": []}
            self.sessions[video] = session

    def record(self, video, session, frame, descriptor, meta, first: bool) -> None:
        if first:
            self._open(video, session)
        elif self.sessions.get(video) not in (session, None):
            return  # a late call of a render that is over: it changes nothing
        self._check(video, session)
        self.ranker.record(video, frame, descriptor, meta)

    def rank(self, video, session, text, candidates, keep):
        self._check(video, session)
        held = self.ranker.videos[video]["frames"]
        missing = sorted({f for row in candidates for f in row} - held.keys())
        if missing:
            raise VideoStateLost(f"memory shard {self.index} lost frames {missing} of video {video!r}")
        return self.ranker.rank(video, text, candidates, keep)

    def release(self, video, session):
        self._check(video, session)
        self.sessions.pop(video, None)
        return self.ranker.release(video)

    def summary(self, video, session):
        self._check(video, session)
        return self.ranker.summary(video)

    def export(self, video, session):
        self._check(video, session)
        return self.ranker.export(video)

    def adopt(self, video, session, state):
        self._open(video, session)
        self.ranker.adopt(video, state)

    def stats(self) -> dict:
        return {"shard": self.index, "videos": len(self.ranker.videos), "bytes": self.ranker.nbytes(),
                "node": ray.get_runtime_context().get_node_id()}


def shard_for(video: str, shards: int) -> int:
    """Stable across processes and runs (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(video.encode(), digest_size=8).digest(), "big") % shards


class MemoryServiceClient:
    """The `memflow.memory.nam.Ranker` of a replica, backed by the shards.

    `record` is fire-and-forget: Ray runs one caller's calls to one actor in order,
    so the next `rank` (which waits) sees it, and an error it raised surfaces at
    the next `rank` or at `release`."""

    def __init__(self, shards: list):
        self.shards = shards
        self._opened: dict[str, str] = {}  # video -> this render's session with its shard

    def _shard(self, video: str):
        return self.shards[shard_for(video, len(self.shards))]

    def _get(self, ref):
        """A shard's answer; a shard that cannot answer is the cluster's failure, not the script's."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ClusterFault):
                raise e.cause from None  # VideoStateLost: the shard restarted without this video
            raise
        except ray.exceptions.RayActorError as e:
            raise ShardUnavailable(f"memory shard unreachable ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]})") from None

    def record(self, video, frame, descriptor, meta=None):
        first = video not in self._opened
        session = self._opened.setdefault(video, uuid.uuid4().hex)
        self._shard(video).record.remote(video, session, frame, descriptor.float().cpu(), meta, first)

    def rank(self, video, text, candidates, keep):
        session = self._opened.get(video, "")
        return self._get(self._shard(video).rank.remote(video, session, text.float().cpu(), candidates, keep))

    def release(self, video):
        if video not in self._opened:
            return None  # nothing recorded: memory off, or shorter than one prototype
        session = self._opened.pop(video)
        return self._get(self._shard(video).release.remote(video, session))

    def summary(self, video):
        if video not in self._opened:
            return None
        return self._get(self._shard(video).summary.remote(video, self._opened[video]))

    def fork(self, video, into):
        """A branch of the story: `into` starts with `video`'s entries, on its own shard
        (descriptors cross the wire, a few hundred KB per prototype, never KV)."""
        if video not in self._opened:
            return  # nothing recorded yet: `into` starts afresh with its first record
        state = self._get(self._shard(video).export.remote(video, self._opened[video]))
        session = self._opened[into] = uuid.uuid4().hex
        self._shard(into).adopt.remote(into, session, state)  # in order before this caller's next call there


def shard_names(count: int, name_prefix: str) -> list[str]:
    """Replicas find the shards by these names (ray.get_actor), not through handles passed in."""
    return [f"{name_prefix}-{i}" for i in range(count)]


def start_shards(count: int, name_prefix: str) -> list:
    """SPREAD: shards on different nodes, so that a lost node takes few videos' state with it."""
    return [MemoryShard.options(name=name, scheduling_strategy="SPREAD").remote(i)
            for i, name in enumerate(shard_names(count, name_prefix))]
