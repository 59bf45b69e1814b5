"""The memory bank service: NAM ranking for every video in flight, as sharded Ray actors.

The KV tensors stay on the replica's GPU; what crosses the wire is one [L, H, D]
mean-key descriptor per recorded prototype and one per ranking query (NAM is exact
on these, memflow-algorithm.md section 3), and frame ids back. Shards are chosen by
a stable hash of the video id. A shard is an `InProcessRanker` behind an actor:
per video it keeps the descriptors and metadata of every recorded prototype and a
retrieval trace, returned when the video is released; releasing frees the video's
state, so a shard's memory does not grow with the number of videos rendered.

A shard that dies is restarted by Ray with empty state. The client marks each
video's first record; a shard asked about a video it never saw open raises
`VideoStateLost`, which fails the render attempt so the driver retries the script
rather than let the video go on with a silently degraded memory. A first record
starts the video afresh, so a retry never inherits the state (and retrieval trace)
of an attempt whose replica died before releasing it.
"""
from __future__ import annotations

import hashlib

import ray

from memflow.memory.nam import InProcessRanker


class VideoStateLost(RuntimeError):
    """The shard holding this video's memory restarted: the render must be retried."""


# A call that meets the shard restarting waits for it and runs there (max_task_retries),
# rather than fail at once: every call is safe to repeat (state lost raises VideoStateLost).
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class MemoryShard:
    def __init__(self, index: int):
        self.index = index
        self.ranker = InProcessRanker()

    def _check(self, video: str) -> None:
        if video not in self.ranker.videos:
            raise VideoStateLost(f"memory shard {self.index} holds no state for video {video!r} "
                                 "(it restarted since the video began)")

    def record(self, video, frame, descriptor, meta, first: bool) -> None:
        if first:  # a render (re)starts: drop what an attempt that died mid-video left here
            self.ranker.release(video)
        else:
            self._check(video)
        self.ranker.record(video, frame, descriptor, meta)

    def rank(self, video, text, candidates, keep):
        self._check(video)
        return self.ranker.rank(video, text, candidates, keep)

    def release(self, video):
        self._check(video)
        return self.ranker.release(video)

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
        self._opened: set[str] = set()

    def _shard(self, video: str):
        return self.shards[shard_for(video, len(self.shards))]

    def record(self, video, frame, descriptor, meta=None):
        first = video not in self._opened
        self._opened.add(video)
        self._shard(video).record.remote(video, frame, descriptor.float().cpu(), meta, first)

    def rank(self, video, text, candidates, keep):
        return ray.get(self._shard(video).rank.remote(video, text.float().cpu(), candidates, keep))

    def release(self, video):
        if video not in self._opened:
            return None  # nothing recorded: memory off, or shorter than one prototype
        self._opened.discard(video)
        return ray.get(self._shard(video).release.remote(video))


def shard_names(count: int, name_prefix: str) -> list[str]:
    """Replicas find the shards by these names (ray.get_actor), not through handles passed in."""
    return [f"{name_prefix}-{i}" for i in range(count)]


def start_shards(count: int, name_prefix: str) -> list:
    """SPREAD: shards on different nodes, so that a lost node takes few videos' state with it."""
    return [MemoryShard.options(name=name, scheduling_strategy="SPREAD").remote(i)
            for i, name in enumerate(shard_names(count, name_prefix))]
