"""Story trees: every node a video, the chunks they share generated once.

The videos of a branching script (memflow/script.py `Script.nodes`) are laid out as a
radix tree over their chunk keys (memflow/story.py `chunk_keys`): a `Run` is a stretch of
chunks that the same videos share, and its children are where they part. Where they
part is decided from the keys (the plans), not assumed at a segment boundary: two
branches that open with the same segment share it too.

`TreeRender` walks the runs depth first on one story. At a run with children it forks
the story (and the VAE decoder's causal cache) for each child but the last, which goes
on with the original: at most one fork per depth is held at a time, whatever the number
of branches. Each run's chunks are decoded once, in a second thread while the next are
generated (memflow/chunkpipe.py); a run with children keeps its frames in a spool on
local disk, and every video that contains them is encoded from the spools of its
ancestors, then its own frames as they are decoded. A chunk whose latents are known
(`known`: from a parent's saved latents, or a checkpoint of an attempt that died) is
replayed, not generated.

A plain script is a tree of one video: one run, no fork, no spool.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .chunkpipe import ChunkPipe
from .pipeline import ChunkClock, Generation
from .script import Node, Script
from .story import ChunkEvent, Story
from .video import FrameSpool


@dataclass
class Video:
    """One video of a story tree: its node, the keys of its chunks, and those of its parent
    (the tree parent, or the video it continues) to tell where it forked."""

    node: Node
    keys: list[str]
    parent_keys: list[str] | None = None

    @property
    def video_id(self) -> str:
        return self.node.video_id


@dataclass
class Run:
    """Chunks [start, end) shared by `videos`; `ending`: the videos whose last chunk is end - 1."""

    start: int
    end: int
    videos: list[Video]
    ending: list[Video]
    children: list["Run"] = field(default_factory=list)

    @property
    def script(self) -> Script:
        """Where this run's chunks take their prompts and seeds from: any video through it."""
        return self.videos[0].node.script

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()


def plan_runs(videos: list[Video], start: int = 0) -> Run:
    """The radix tree of `videos` (which share their keys before `start`)."""
    end = start
    while all(len(v.keys) > end for v in videos) and len({v.keys[end] for v in videos}) == 1:
        end += 1
    groups: dict[str, list[Video]] = {}
    for v in videos:
        if len(v.keys) > end:
            groups.setdefault(v.keys[end], []).append(v)
    return Run(start, end, videos, [v for v in videos if len(v.keys) == end],
               [plan_runs(group, end) for group in groups.values()])


@dataclass(frozen=True)
class Known:
    """Latents of a chunk computed before: `source` "replayed" (a parent's saved latents)
    or "resumed" (a checkpoint of an earlier attempt)."""

    latents: torch.Tensor  # [1, C, F, h, w] float32
    source: str


class VideoSink(Protocol):
    """Where a video's frames go (an encoder, metrics): uint8 RGB [H, W, 3] in order."""

    def write(self, frame: np.ndarray) -> None: ...

    def close(self) -> object: ...


@dataclass
class _Step:
    """A run as rendered: its latents (on the device), chunk seconds, how each chunk was
    obtained, its frames' spool (when videos below it need them)."""

    run: Run
    latents: list[torch.Tensor]
    seconds: list[float]
    sources: list[str | None]  # None: generated; else Known.source
    spool: FrameSpool | None
    tail_seconds: float = 0.0  # decoding and encoding after the run's last chunk


def accounting(video: Video, path: list[_Step]) -> dict:
    """How this video's chunks were obtained: shared (generated once for several videos),
    replayed (rebuilt from known latents, `resumed` of them from a checkpoint), generated
    for it alone; `fork_chunk`: the chunks it has in common with its parent; `prefix`: how
    those were obtained (the kind of the last of them)."""
    kinds = [source or ("shared" if len(step.run.videos) > 1 else "generated")
             for step in path for source in step.sources]
    fork = None
    if video.parent_keys is not None:
        fork = next((i for i, (a, b) in enumerate(zip(video.keys, video.parent_keys)) if a != b),
                    min(len(video.keys), len(video.parent_keys)))
    prefix = None
    if fork:
        last = kinds[fork - 1]
        prefix = "regenerated" if last == "generated" else last
    elif "resumed" in kinds:
        prefix = "resumed"
    return {"chunks": len(kinds), "shared": kinds.count("shared"),
            "replayed": kinds.count("replayed") + kinds.count("resumed"), "resumed": kinds.count("resumed"),
            "generated": kinds.count("generated"), "fork_chunk": fork, "prefix": prefix}


class TreeRender:
    """Render every video of a story tree on one generator (see the module docstring).

    `open_video(video)` gives each video's sink, opened as its last run begins;
    `on_video(video, generation)` is told of each video once its last chunk is decoded
    (`generation.decoded`: what its sink's close returned); `on_chunk(event, key, latents)`
    of each chunk computed, numbered over the whole tree, with its key and latents (on the
    device: checkpoints); `known(key)` gives the `Known` latents of a chunk, or None."""

    def __init__(self, gen, videos: list[Video], *, open_video: Callable[[Video], VideoSink],
                 on_video: Callable[[Video, Generation], None],
                 on_chunk: Callable[[ChunkEvent, str, torch.Tensor], None] | None = None,
                 known: Callable[[str], Known | None] | None = None, ranker=None, stream_id: str | None = None,
                 spool_dir: str | None = None):
        if not videos:
            raise ValueError("a story tree with no video to render")
        self.gen, self.videos, self.root = gen, videos, plan_runs(videos)
        self.open_video, self.on_video = open_video, on_video
        self.on_chunk, self.known = on_chunk, known or (lambda key: None)
        self.ranker, self.stream_id, self.spool_dir = ranker, stream_id or videos[0].video_id, spool_dir
        self.total = sum(run.end - run.start for run in self.root.walk())
        self.computed = self.generated = self.replayed = 0
        self._forks = 0
        self._open: list[Story] = []  # stories whose memory is still open (released at the end)

    def render(self) -> dict:
        """Render everything; returns {"generated": chunks, "replayed": chunks} (each chunk
        of the tree counted once)."""
        with contextlib.ExitStack() as stack:
            spool_dir = self.spool_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="memflow-spool-"))
            self.spool_dir = spool_dir
            story = self.gen.story(self.root.script, self.ranker, self.stream_id)
            self._open.append(story)
            try:
                self._visit(self.root, story, self.gen.vae.decoder(), [])
            finally:
                for s in self._open:  # released here if an error stopped the walk
                    with contextlib.suppress(Exception):
                        s.memory.close()
        return {"generated": self.generated, "replayed": self.replayed}

    def _visit(self, run: Run, story: Story, decoder, path: list[_Step]) -> None:
        story.follow(run.script)
        step = _Step(run, [], [], [], FrameSpool(self.spool_dir) if run.children else None)
        try:
            frames = self._chunks(run, story, decoder, step, path)
            path = [*path, step]
            for video in run.ending:
                self.on_video(video, self._generation(video, path, story, frames[video.video_id]))
            if not run.children:
                self._close(story)
            for i, child in enumerate(run.children):
                last = i + 1 == len(run.children)
                self._forks += not last
                branch = story if last else story.fork(f"{self.stream_id}~{self._forks}")
                if not last:
                    self._open.append(branch)
                self._visit(child, branch, decoder if last else decoder.fork(), path)
        finally:
            if step.spool is not None:
                step.spool.delete()

    def _chunks(self, run: Run, story: Story, decoder, step: _Step, path: list[_Step]) -> dict:
        """Compute the run's chunks, decoded alongside into its videos' sinks; returns what
        each sink's close returned."""
        sinks = {v.video_id: self.open_video(v) for v in run.ending}
        pipe = ChunkPipe(self.gen.device).start(lambda chunks: _decode(chunks, decoder, sinks, step.spool, path))
        clock = ChunkClock(self.gen.device)
        keys = run.videos[0].keys
        try:
            clock.mark()
            for c in range(run.start, run.end):
                known = self.known(keys[c])
                if known is not None:
                    x0 = known.latents.to(self.gen.device)
                    event = story.replay(x0)
                    self.replayed += 1
                else:
                    event, x0 = story.step()
                    self.generated += 1
                clock.mark()
                pipe.put(x0)
                step.latents.append(x0)
                step.sources.append(known.source if known is not None else None)
                self.computed += 1
                if self.on_chunk is not None:
                    self.on_chunk(ChunkEvent(self.computed - 1, self.total, event.seconds, event.segment,
                                             event.replayed), keys[c], x0)
        except BaseException:
            pipe.abort()
            raise
        generated = time.perf_counter()
        frames = pipe.finish()
        step.tail_seconds = time.perf_counter() - generated
        step.seconds = clock.seconds()
        return frames

    def _generation(self, video: Video, path: list[_Step], story: Story, decoded) -> Generation:
        script = video.node.script
        latents = torch.cat([x for s in path for x in s.latents], 2).float().cpu()
        return Generation(video.video_id, script, script.plan(self.gen.memory.frames_per_chunk), latents,
                          [t for s in path for t in s.seconds], story.memory.trace, story.peak_bytes, script.fps,
                          story.memory.summary(), story.memory.sma_trace, decoded, path[-1].tail_seconds,
                          story=accounting(video, path))

    def _close(self, story: Story) -> None:
        story.memory.close()
        self._open.remove(story)


def _decode(chunks, decoder, sinks: dict[str, VideoSink], spool: FrameSpool | None, path: list[_Step]) -> dict:
    """The decoding thread of one run: the ancestors' frames into each video that ends
    here, then the run's own frames as they are decoded, into those videos and the spool."""
    try:
        for sink in sinks.values():
            for step in path:
                for frame in step.spool.frames():
                    sink.write(frame)
        for chunk in chunks:
            for frame in decoder.decode(chunk):
                for sink in sinks.values():
                    sink.write(frame)
                if spool is not None:
                    spool.write(frame)
    except BaseException:
        for sink in sinks.values():
            with contextlib.suppress(Exception):
                getattr(sink, "abort", lambda: None)()
        raise
    return {video_id: sink.close() for video_id, sink in sinks.items()}


def videos_of(gen, script: Script, skip: set[str] = frozenset()) -> list[Video]:
    """The videos of a (resolved) script to render: its nodes with `video` true, less `skip`
    (committed already), each with its keys and its tree parent's."""
    nodes = script.nodes()
    keys = {n.video_id: gen.chunk_keys(n.script) for n in nodes}
    return [Video(n, keys[n.video_id], keys.get(n.parent)) for n in nodes if n.video and n.video_id not in skip]


def render_tree(gen, script: Script, folder, *, crf: int = 18, ranker=None,
                on_chunk: Callable[[ChunkEvent], None] | None = None) -> dict[str, Generation]:
    """Render every node of a branching script to `folder`/<id>.mp4, the chunks they share
    generated once; returns each video's Generation (latents identical to rendering its
    flattened script alone)."""
    from pathlib import Path

    from .video import Mp4Writer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Generation] = {}
    TreeRender(gen, videos_of(gen, script),
               open_video=lambda v: Mp4Writer(folder / f"{v.video_id}.mp4", v.node.script.fps, crf),
               on_video=lambda v, g: results.__setitem__(v.video_id, g), on_chunk=on_chunk, ranker=ranker).render()
    return results
