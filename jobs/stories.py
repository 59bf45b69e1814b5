"""The driver's work, story by story: manifest lines become render tasks.

A line is a script, a tree of them (`branches`) or a continuation (`continues`). Every
node of a tree is a video with an id of its own: ids are checked across the whole
manifest (a repeat of the same line is rendered once, an id given to other content is
a bad line), and on resume against what earlier runs committed, held in memory
(`Committed`, read from the dataset table at start-up: no read per line; nodes committed
with the same content are skipped; a line whose nodes are all committed is done).

A continuation names its parent by video id (this output) or record URL (any output).
It is resolved against the parent's record: the parent's story, then the new segments,
rendered as one new video; the parent must have been rendered with this job's preset,
model fingerprint, memory mode and policy, resolution and fps, else the line is bad,
naming the field. A parent that is not committed yet may still be in this manifest
(before the line or after it): the line waits until that parent commits, and fails if
it fails. When the manifest is read to the end, lines still waiting on a parent that
nothing will render are reported: a cycle (a continues b continues a), or no such video.
Waiting lines are held in memory (their number is bounded by the manifest's).
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import Callable, Iterator

from cluster.dataset import Committed
from cluster.replica import latents_path, record_path
from cluster.scheduler import Task
from cluster.storage import Storage, read_url
from jobs.manifest import ManifestItem
from jobs.settings import BatchSettings
from memflow.script import Script, ScriptError, check_script, content_hash, safe_id


class SeenIds:
    """The video ids handed out this run, with the manifest line and content hash of
    each: a later line with the same id is a repeat (skipped) or a clash (reported).
    One int per id (line << 64 | 64 bits of the hash): about 150 bytes an id with its
    key, 150 MB for a manifest of a million scripts."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def first(self, video_id: str, line: int, digest: str) -> tuple[int, bool] | None:
        """None if the id is new (it is remembered); else (its first line, same content?)."""
        key = int(digest[:16], 16)
        seen = self.ids.setdefault(video_id, line << 64 | key)
        if seen == line << 64 | key:
            return None
        return seen >> 64, seen & (1 << 64) - 1 == key


def committed_record(storage: Storage, video_id: str) -> dict | None:
    try:
        return json.loads(storage.read_text(record_path(video_id)))
    except FileNotFoundError:
        return None


class BadLine(ValueError):
    """A line that cannot be rendered; the message names the field."""


@dataclass
class Waiting:
    """A continuation waiting for its parent to commit."""

    item: ManifestItem
    parent: str  # the parent's video id


@dataclass
class TaskSource:
    """What the scheduler renders, pulled as replicas have room (cluster/scheduler.py):
    `next()` gives a task, or None when none is ready now; `exhausted` once none will
    come. The driver tells it of every task that ended (`finished`), which releases the
    continuations waiting on its videos. `reject(item, reason)`, `skipped(n)`, `repeated()`:
    the driver's bookkeeping of bad lines, videos committed before (and whether that was
    all of the line's), repeated lines."""

    items: Iterator[ManifestItem]
    storage: Storage
    settings: BatchSettings
    reject: Callable[[ManifestItem, str], None]
    skipped: Callable[[int, bool], None]
    repeated: Callable[[], None]
    committed: Committed = field(default_factory=Committed)  # what the output holds (cluster/dataset.py)
    seen: SeenIds = field(default_factory=SeenIds)
    ready: collections.deque = field(default_factory=collections.deque)
    waiting: dict[str, list[Waiting]] = field(default_factory=dict)  # parent id -> lines waiting on it
    in_flight: dict[str, set[str]] = field(default_factory=dict)  # task id -> its video ids not yet committed
    read_all: bool = False

    def __post_init__(self):
        self.limits = self.settings.limits(self.settings.preset)
        self.fingerprint = self.settings.fingerprint()

    # -- the scheduler's side -------------------------------------------------------------------
    def next(self) -> Task | None:
        while not self.ready and not self.read_all:
            item = next(self.items, None)
            if item is None:
                self.read_all = True
                self._settle()
            else:
                self._read(item)
        return self.ready.popleft() if self.ready else None

    @property
    def exhausted(self) -> bool:
        return self.read_all and not self.ready and not self.waiting

    def __iter__(self):  # a plain iterator of tasks, for callers that never wait
        return iter(self.next, None)

    def finished(self, task: Task, result: dict | None) -> None:
        """A task ended: its committed videos release the continuations waiting on them;
        when it failed, those continuations fail too."""
        videos = self.in_flight.pop(task.video_id, set())
        records = result["records"] if result else []
        committed = {r["id"] for r in records}
        own = {vid: vid for vid in videos}  # the line's own id strings, held by the seen ids too: one copy in memory
        for record in records:
            self.committed.add(own.get(record["id"], record["id"]), record.get("script_sha256"))
        for vid in committed | videos:
            waiting = self.waiting.pop(vid, [])
            if waiting and vid not in committed and committed_record(self.storage, vid) is not None:
                committed.add(vid)  # committed by an attempt before the task failed
            for waiting in waiting:
                if vid in committed:
                    self._read(waiting.item)
                else:
                    self.reject(waiting.item, f"continues: its parent {vid!r} failed: "
                                              f"{task.errors[-1] if task.errors else 'see its line'}")
        if self.read_all:
            self._settle()

    # -- lines ------------------------------------------------------------------------------------
    def _read(self, item: ManifestItem) -> None:
        if not item.ok:
            self.reject(item, item.error)
            return
        try:
            task = self._task(item)
        except BadLine as e:
            self.reject(item, str(e))
            return
        if task is not None:
            self.ready.append(task)

    def _task(self, item: ManifestItem) -> Task | None:
        script, parent = item.script, None
        if script.continues is not None:
            record = self._parent(item)
            if record is None:
                return None  # waiting for its parent
            script, parent = self._continued(script, record)
        nodes = script.nodes()
        line_hash = content_hash(item.script)

        def node_hash(node) -> str:  # a plain script is its own one node: hashed once
            return line_hash if node.script is item.script else content_hash(node.script)

        # every node's id against this run's and the earlier runs' (a repeated line: rendered once)
        first = self.seen.first(script.video_id, item.line, line_hash)
        if first is not None:
            line, same = first
            if same:
                self.repeated()
                return None
            raise BadLine(f"duplicate id {script.video_id!r}: line {line} has it with different content; give one "
                          "of them another id")
        for node in nodes[1:]:
            first = self.seen.first(node.video_id, item.line, node_hash(node))
            if first is not None:
                raise BadLine(f"duplicate id {node.video_id!r}: line {first[0]} has it too; give each video its "
                              "own id")
        todo = set()
        for node in (n for n in nodes if n.video):
            same = self.committed.same(node.video_id, node_hash(node))
            if same is None:
                todo.add(node.video_id)
            elif not same:
                raise BadLine(f"id {node.video_id!r} was committed by an earlier run with different content "
                              f"({record_path(node.video_id)}); give this script another id, or delete that record "
                              "to render it again")
        self.skipped(sum(n.video for n in nodes) - len(todo), not todo)
        if not todo:
            return None
        self.in_flight[script.video_id] = todo
        return Task(script.video_id, {"script": script.model_dump(mode="json"), "parent": parent}, item.line)

    # -- continuations ----------------------------------------------------------------------------
    def _parent(self, item: ManifestItem) -> dict | None:
        """The committed record of the video a line continues, or None when the line waits."""
        ref, own = item.script.continues, item.script.video_id
        if "://" in ref or ref.endswith(".json"):
            try:
                return json.loads(read_url(ref, self.settings.endpoint_url))
            except FileNotFoundError:
                raise BadLine(f"continues: no record at {ref!r}; give a record URL of a committed video "
                              "(<output>/records/<id>.json) or a video id of this output") from None
            except ValueError as e:
                raise BadLine(f"continues: {ref!r} is not a record ({e})") from None
        if safe_id(ref) != ref:
            raise BadLine(f"continues: {ref!r} is not a video id of this output (letters, digits, '.', '_', '-'), "
                          "nor a record URL (<output>/records/<id>.json)")
        if ref == own:
            raise BadLine(f"continues: {own!r} cannot continue itself")
        record = committed_record(self.storage, ref) if ref in self.committed else None
        if record is None:
            self.waiting.setdefault(ref, []).append(Waiting(item, ref))
        return record

    def _continued(self, script: Script, record: dict) -> tuple[Script, dict]:
        """The line resolved against its parent's record, checked as one script."""
        model, settings = record.get("model", {}), self.settings
        for name, theirs, ours in (("preset", model.get("preset"), settings.preset),
                                   ("memory", model.get("memory"), settings.memory),
                                   ("fidelity", model.get("fidelity"), settings.fidelity)):
            if theirs != ours:
                raise BadLine(f"continues: {record['id']!r} was rendered with {name} {theirs!r}, this job renders "
                              f"{name} {ours!r}; continue it with the same {name}")
        if model.get("fingerprint") != self.fingerprint:
            raise BadLine(f"continues: {record['id']!r} was rendered with another model (fingerprint "
                          f"{model.get('fingerprint')} vs this job's {self.fingerprint}: other weights or memory "
                          "config); continue it with the model it was rendered with")
        parent = Script.model_validate(record["script"])
        height, width = parent.resolution or (record["height"], record["width"])
        if script.resolution is not None and tuple(script.resolution) != (height, width):
            raise BadLine(f"resolution: {list(script.resolution)} differs from the parent's {[height, width]}; a "
                          "continuation takes its parent's resolution")
        if "fps" in script.model_fields_set and script.fps != parent.fps:
            raise BadLine(f"fps: {script.fps} differs from the parent's {parent.fps}; a continuation takes its "
                          "parent's fps")
        resolved = script.continued(parent)
        try:
            check_script(resolved, self.limits)
        except ScriptError as e:
            raise BadLine(str(e)) from None
        latents = record.get("latents_url")
        if latents is None and self.storage.exists(latents_path(record["id"])):
            latents = self.storage.url_for(latents_path(record["id"]))
        root = (record.get("story") or {}).get("root") or record["id"]
        return resolved, {"id": record["id"], "script": record["script"], "root": root, "latents": latents}

    def _settle(self) -> None:
        """The manifest is read: lines waiting on a parent that no task in flight holds can
        never be rendered; report them (a cycle, or no such video)."""
        pending = set().union(*self.in_flight.values()) if self.in_flight else set()
        orphans = [p for p in self.waiting if p not in pending]
        # a parent waiting itself (continuing another waiting line) waits on what that one does
        parent_of = {w.item.script.video_id: w.parent for ws in self.waiting.values() for w in ws}
        for parent in orphans:
            for waiting in self.waiting.pop(parent):
                chain, at = [waiting.item.script.video_id], parent
                while at in parent_of and at not in chain:
                    chain.append(at)
                    at = parent_of[at]
                if at in chain:
                    self.reject(waiting.item, "continues: a cycle " + " -> ".join([*chain[chain.index(at):], at]))
                elif at in pending:
                    self.waiting.setdefault(parent, []).append(waiting)  # its chain ends in flight: it may come
                else:
                    self.reject(waiting.item, f"continues: no committed video {parent!r} in this output, and no line "
                                              "of this manifest renders it")
