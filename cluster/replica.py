"""Generator replicas: one Ray actor per GPU, weights loaded once, script after script.

A render commits in this order: mp4 uploaded to `videos/<id>.mp4`, then the record
`records/<id>.json` (the commit marker, one atomic PUT). A replica killed at any
point before the record leaves no committed trace; a retry overwrites the orphan
video. A retry of a script whose record already exists (the replica died after
committing, before answering) returns that record instead of rendering again, so
no script is committed twice.

Replicas reach object storage with their node's own credentials (instance role,
service account, secret env: see infra/), never with the driver's: nothing secret
travels as an actor argument, which Ray may keep in its object store and spill to
disk. Constructor arguments are plain values (shards are named, not handed over as
actor handles), so a restart never depends on objects the driver owns.

`status()` answers while a render runs (its own thread): the driver's stall
watchdog reads `ticks`, which move with every chunk, encoded frame and stage, and
with every storage retry (a replica waiting out a storage outage is not hung).

Renders are pipelined: two run at once (the scheduler keeps two scripts in flight
per replica), one script generates at a time (its turn on the GPU ends with its last
chunk), and each script's frames are decoded, measured and encoded alongside its
generation (memflow/chunkpipe.py). So while script i+1 generates, script i finishes
decoding, encoding, uploading and commits; at most one finished script waits, and a
failure while finishing (an upload) fails that script alone. Which script holds the GPU
turn is posted to the GCS (`turn_holder`): when the replica dies, the driver charges
that script, not the one finishing beside it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Literal

import ray
import torch
from ray.experimental import internal_kv
from ray.util import metrics
from safetensors.torch import load, save

from memflow.pipeline import MemFlowGenerator
from memflow.quality import QualityMeter, load_clip, load_dino
from memflow.script import Script, canonical, content_hash
from memflow.tree import Known, TreeRender, videos_of
from memflow.video import Mp4Writer

from .checkpoint import Checkpoints
from .memory_service import MemoryServiceClient
from .settings import ReplicaSettings
from .storage import Storage, read_url

log = logging.getLogger(__name__)

TMP_PREFIX = "memflow-replica-"  # + pid: a folder of a replica that is gone can be told apart
# test-only fault injection, see _faults_for_tests
HANG_ENV, CRASH_ENV, RAISE_ENV = "MEMFLOW_TEST_HANG", "MEMFLOW_TEST_CRASH", "MEMFLOW_TEST_RAISE"


def record_path(video_id: str) -> str:
    return f"records/{video_id}.json"


def video_path(video_id: str) -> str:
    return f"videos/{video_id}.mp4"


def latents_path(video_id: str) -> str:
    return f"latents/{video_id}.safetensors"


TURNS_NAMESPACE = "memflow-gpu-turns"  # GCS key-value namespace: replica actor id -> video generating


def post_turn(actor_id: str, video_id: str | None) -> None:
    """Post (None: clear) the script holding this replica's GPU turn. Kept in the GCS, not
    in the replica, because it is read when the replica's process has died. Best effort:
    without it the driver charges a death to the replica's oldest call, never fails a render."""
    try:
        if video_id is None:
            internal_kv._internal_kv_del(actor_id, namespace=TURNS_NAMESPACE)
        else:
            internal_kv._internal_kv_put(actor_id, video_id, namespace=TURNS_NAMESPACE)
    except Exception as e:  # the GCS unreachable for a moment
        log.warning("could not post the GPU turn of %s: %s", video_id, e)


def turn_holder(actor) -> str | None:
    """The script a replica actor (handle) was generating when last heard of, or None
    when its GPU was idle or only finishing scripts (driver side, after a death or stall)."""
    value = internal_kv._internal_kv_get(actor._actor_id.hex(), namespace=TURNS_NAMESPACE)
    return value.decode() if value else None


class ReplicaStartError(RuntimeError):
    """A replica could not start (no credentials on its node, weights missing, ...)."""


Stage = Literal["starting", "idle", "generate", "upload"]


@dataclass
class ReplicaStatus:
    """What a replica is doing (`status()`), read by the stall watchdog: `ticks` moves with
    every change. video/stage/chunk belong to the script generating; `finishing` names the
    one being decoded, encoded or uploaded beside it."""

    replica: int
    node: str
    video: str | None = None
    stage: Stage = "starting"
    chunk: int = 0
    chunks: int = 0
    encoded: int = 0
    finishing: str | None = None
    ticks: int = 0
    slowest_chunk_s: float = 0.0
    storage_retries: int = 0


@dataclass
class Timeline:
    """Epoch seconds: when the GPU was this story's, and when each of its videos committed."""

    generate_start: float
    generate_end: float | None = None


@dataclass
class Render:
    """One story (a script, or every node of a tree) on its way through a replica: it
    generates, each video finishes (upload, latents) and commits as its last run ends."""

    video_id: str  # the story's root: the scheduler's task
    attempt: int
    tmp: str
    timeline: Timeline
    started: float  # perf_counter at the GPU turn
    parent: dict | None  # the video it continues: {"id", "script", "root", "latents"}
    history: dict  # what its earlier renders cost (cluster/scheduler.py Task.history)
    meters: dict = field(default_factory=dict)  # video id -> QualityMeter


class _Sink:
    """A video's frames: measured, encoded to a local mp4, counted for the watchdog."""

    def __init__(self, path: str, fps: int, crf: int, meter: QualityMeter, tick):
        self.writer, self.meter, self.tick = Mp4Writer(path, fps, crf), meter, tick

    def write(self, frame) -> None:
        self.meter.add(frame)
        self.writer.write(frame)
        self.tick(self.writer.count)

    def close(self) -> int:
        self.meter.finish()
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"status": 1, "render": 2})
class GeneratorReplica:
    def __init__(self, config: ReplicaSettings, shards: list[str] | None = None, index: int = 0):
        self.config, self.index = config, index
        self._lock = threading.Lock()
        self._gpu = threading.Lock()  # one story generates at a time (GpuTurn)
        self._actor_id = ray.get_runtime_context().get_actor_id()
        post_turn(self._actor_id, None)  # a turn the previous process held died with it
        self._status = ReplicaStatus(index, ray.get_runtime_context().get_node_id())
        clean_stale_tmp()
        try:
            self.storage = Storage(config.output, config.endpoint_url)
            self.storage.on_retry = lambda: self._update(storage_retries=self._status.storage_retries + 1)
            self.storage.exists("records")  # fail here, once, when this node cannot reach the output
            self.generator = MemFlowGenerator.from_settings(config)
            device = self.generator.device
            self.clip = load_clip(config.clip_model, device) if config.clip_model else None
            self.dino = load_dino(config.dino_model, device) if config.dino_model else None
            self.ranker = MemoryServiceClient([ray.get_actor(name) for name in shards]) if shards else None
        except Exception as e:
            raise ReplicaStartError(f"replica {index} could not start on {socket.gethostname()}: "
                                    f"{type(e).__name__}: {e}") from e
        self._chunks = metrics.Counter("memflow_chunks_generated", "latent chunks generated", tag_keys=("replica",))
        self._chunk_s = metrics.Histogram("memflow_chunk_seconds", "seconds per chunk",
                                          boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=("replica",))
        self._update(stage="idle")

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        """What this replica is doing now (answers while a render runs)."""
        with self._lock:
            return asdict(self._status)

    def _update(self, **changes) -> None:
        """Change the status; every change is progress for the stall watchdog."""
        with self._lock:
            for name, value in changes.items():
                setattr(self._status, name, value)
            self._status.ticks += 1

    @ray.method(concurrency_group="render")
    def render(self, job: dict, video_id: str, attempt: int) -> dict:
        """Render a story and commit each of its videos; returns {"records": [...], "chunks":
        {"generated": n, "replayed": n}}. `job`: {"script": the resolved script (maybe with
        branches), "parent": the video it continues or None}. Videos committed already
        (by an attempt that died after committing them) are skipped. Two calls run at once:
        one generates while the other finishes (see the module docstring)."""
        self._update()  # the status keeps naming the story generating, if one is
        script = Script.model_validate(job["script"])
        nodes = [n for n in script.nodes() if n.video]
        done = {n.video_id: record for n in nodes if (record := self._committed(n.video_id)) is not None}
        if len(done) == len(nodes):
            return {"records": list(done.values()), "chunks": {"generated": 0, "replayed": 0}}
        videos = videos_of(self.generator, script, skip=set(done))
        parent = job.get("parent")
        known = {}
        if parent is not None:  # the root continues a video: its chunks are the parent's
            keys = self.generator.chunk_keys(Script.model_validate(parent["script"]))
            for video in (v for v in videos if v.node.parent is None):
                video.parent_keys = keys
            known = self._parent_latents(parent, keys)
        checkpoints = Checkpoints(self.storage, video_id, self.config.checkpoint_seconds)
        known.update(checkpoints.load())
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp, \
                GpuTurn(self._gpu, lambda vid: post_turn(self._actor_id, vid), video_id,
                        pipelined=self.config.pipelined) as turn, \
                ThreadPoolExecutor(1, thread_name_prefix="memflow-finish") as finisher:
            run = Render(video_id, attempt, tmp, Timeline(time.time()), time.perf_counter(), parent,
                         job.get("history") or {})
            finishing: list[Future] = []
            try:
                chunks = self._generate(run, turn, videos, known, checkpoints,
                                        lambda v, g: finishing.append(finisher.submit(self._finish, run, turn, v, g)))
                records = [f.result() for f in finishing]
            finally:
                checkpoints.wait()
                if turn.held:
                    self._update(video=None, stage="idle")
                self._update(finishing=None)
        checkpoints.delete()
        return {"records": [*done.values(), *records], "chunks": chunks}

    def _committed(self, video_id: str) -> dict | None:
        if not self.storage.exists(record_path(video_id)):
            return None
        return json.loads(self.storage.read_text(record_path(video_id)))

    def _parent_latents(self, parent: dict, keys: list[str]) -> dict[str, Known]:
        """The saved latents of the video a story continues, by its chunk keys: its chunks
        are replayed, not generated (none if it kept no latents, or they do not fit its script)."""
        if not parent.get("latents"):
            return {}
        try:
            latents = load(read_url(parent["latents"], self.config.endpoint_url))["latents"]
        except (FileNotFoundError, KeyError, ValueError) as e:
            log.warning("the latents of %s cannot be used (%s): its story is generated again", parent["id"], e)
            return {}
        fpc = self.generator.memory.frames_per_chunk
        if latents.shape[2] != len(keys) * fpc:
            log.warning("the latents of %s hold %d frames, its script %d chunks: generated again", parent["id"],
                        latents.shape[2], len(keys))
            return {}
        return {key: Known(x, "replayed") for key, x in zip(keys, latents.split(fpc, dim=2))}

    # -- the stages of a render ----------------------------------------------------------------
    def _generate(self, run: Render, turn: "GpuTurn", videos: list, known: dict, checkpoints: Checkpoints,
                  on_video) -> dict:
        """Generate (or replay) every chunk of the story, each decoded, measured and encoded
        alongside; the GPU turn goes to the next story with the last chunk."""
        tree = TreeRender(self.generator, videos, open_video=lambda v: self._open_video(run, v), on_video=on_video,
                          on_chunk=lambda e, key, x: self._chunk_done(run, turn, checkpoints, e, key, x),
                          known=known.get, ranker=self.ranker, stream_id=run.video_id, spool_dir=run.tmp)
        self._update(video=run.video_id, stage="generate", chunk=0, chunks=tree.total, encoded=0)
        return tree.render()

    def _open_video(self, run: Render, video) -> _Sink:
        script = video.node.script
        plan = script.plan(self.generator.memory.frames_per_chunk)
        meter = run.meters[video.video_id] = QualityMeter(
            [(s.video_start, s.video_end, s.prompt) for s in plan.segments], script.fps, clip=self.clip, dino=self.dino)
        return _Sink(os.path.join(run.tmp, f"{video.video_id}.mp4"), script.fps, self.config.crf, meter,
                     lambda n: self._update(encoded=n))

    def _chunk_done(self, run: Render, turn: "GpuTurn", checkpoints: Checkpoints, event, key, latents) -> None:
        tags = {"replica": str(self.index)}
        if not event.replayed:
            self._chunks.inc(1, tags)
            self._chunk_s.observe(event.seconds, tags)
            checkpoints.add(key, latents)
        self._update(chunk=event.chunk + 1, chunks=event.num_chunks,
                     slowest_chunk_s=max(self._status.slowest_chunk_s, event.seconds))
        if event.chunk == 0:
            _faults_for_tests(run.video_id, run.attempt)
        if event.chunk + 1 == event.num_chunks:
            run.timeline.generate_end = time.time()
        if turn.after_chunk(event):  # the GPU goes to the next story; this one finishes
            self._update(video=None, stage="idle", finishing=f"decode of {run.video_id}")

    def _finish(self, run: Render, turn: "GpuTurn", video, gen) -> dict:
        """Upload one video (and its latents), then commit it (the finishing thread)."""
        vid = video.video_id
        generated = time.perf_counter()
        # the status's video/stage belong to the story generating; a finishing one has its own
        self._update(**({"stage": "upload"} if turn.held and run.timeline.generate_end else
                        {"finishing": f"upload of {vid}"}))
        self.storage.upload_file(os.path.join(run.tmp, f"{vid}.mp4"), video_path(vid))
        if self.config.save_latents:
            self.storage.write_bytes(latents_path(vid), save({"latents": gen.latents.contiguous()}))
        uploaded = time.perf_counter()
        return self._commit(run, video, gen, {"generate_s": gen.seconds, "decode_encode_s": gen.decode_tail_seconds,
                                              "generate_wall_s": generated - run.started,
                                              "upload_s": uploaded - generated})

    def _commit(self, run: Render, video, gen, timings: dict) -> dict:
        """Write the record, the commit marker: last, after everything it points to."""
        node, continued = video.node, run.parent or {}  # a continuation's tree belongs to its parent's story
        story = {"root": continued.get("root") or run.video_id, "parent": node.parent or continued.get("id"),
                 **gen.story}
        timeline = {**asdict(run.timeline), "committed": time.time()}
        record = build_record(self, node.script, gen, node.video_id, gen.decoded, run.attempt,
                              run.meters[node.video_id].result(), timeline, timings, story, run.history)
        self.storage.write_json(record_path(node.video_id), record)
        return record


class GpuTurn:
    """One script's turn to generate on a replica: taken before its first chunk and given
    back with its last one, so the next script generates while this one is decoded,
    encoded and uploaded (`pipelined`); else held until the render ends (serial).
    `post(video_id)` names the holder when taken, `post(None)` when given back."""

    def __init__(self, lock: threading.Lock, post, video_id: str, pipelined: bool = True):
        self.lock, self.post, self.video_id, self.pipelined, self.held = lock, post, video_id, pipelined, False

    def __enter__(self) -> "GpuTurn":
        self.lock.acquire()
        self.held = True
        self.post(self.video_id)
        return self

    def after_chunk(self, event) -> bool:
        """Give the turn back after the last chunk; True when it did."""
        if self.pipelined and self.held and event.chunk + 1 == event.num_chunks:
            self.give_back()
            return True
        return False

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.post(None)
            self.lock.release()

    def __exit__(self, *exc) -> None:
        self.give_back()


def clean_stale_tmp(root: str | None = None) -> list[str]:
    """Remove the temporary folders that replicas killed mid-encode left on this node (their
    process is gone); folders of live processes are left alone. Returns what was removed."""
    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        m = re.fullmatch(re.escape(TMP_PREFIX) + r"(\d+)-.*", name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def _faults_for_tests(video_id: str, attempt: int) -> None:
    """Test-only fault injection, after a render's first chunk, for the videos that a
    replica's environment names (a node's env, or a job's runtime_env) as
    "<video id>[:<attempts>],...": on every attempt, or on the first <attempts> ones.
    MEMFLOW_TEST_HANG hangs, as on a stuck CUDA call (the stall watchdog);
    MEMFLOW_TEST_CRASH kills the replica's process, as a poison script that exhausts it
    would (replica deaths); MEMFLOW_TEST_RAISE raises, as a script that cannot be
    rendered (its own failure). The tests and benchmarks/chaos.py use them."""
    def named(env: str) -> bool:
        for entry in filter(None, os.environ.get(env, "").split(",")):
            vid, _, attempts = entry.partition(":")
            if vid == video_id and (not attempts or attempt <= int(attempts)):
                return True
        return False

    if named(CRASH_ENV):
        os._exit(13)
    if named(RAISE_ENV):
        raise RuntimeError(f"{RAISE_ENV}: {video_id} fails here on purpose")
    while named(HANG_ENV):
        time.sleep(3600)


def build_record(replica, script: Script, gen, video_id: str, frames: int, attempt: int, quality: dict,
                 timeline: dict, timings: dict, story: dict, history: dict) -> dict:
    """Everything a dataset user needs about one video, captions with frame ranges and
    quality metrics included (`quality`: memflow.quality.QualityMeter.result()), and its
    story: root and parent ids, where it forked, how its chunks were obtained."""
    plan = gen.plan
    height, width = script.resolution or (replica.generator.preset.height, replica.generator.preset.width)
    ctx = ray.get_runtime_context()
    return {
        "id": video_id,
        "video": video_path(video_id),
        "video_url": replica.storage.url_for(video_path(video_id)),
        "script": canonical(script),
        "script_sha256": content_hash(script),  # tells a re-used id from a repeat on resume
        "seed": script.seed,
        "fps": gen.fps,
        "width": width,
        "height": height,
        "num_frames": frames,
        "seconds": frames / gen.fps,
        "num_chunks": plan.num_chunks,
        "encoding": {"codec": "h264", "crf": replica.config.crf},
        "segments": [{"index": s.index, "prompt": s.prompt, "start_frame": s.video_start, "end_frame": s.video_end,
                      "start_s": s.video_start / gen.fps, "end_s": s.video_end / gen.fps,
                      "latent_start": s.start_frame, "latent_end": s.end_frame} for s in plan.segments],
        "config": replica.config.model_dump(mode="json"),  # what the replica was built from
        "model": {"preset": replica.config.preset, "weights": replica.config.model or "random",
                  "memory": replica.config.memory, "fidelity": replica.generator.fidelity,
                  "fingerprint": replica.generator.config_fingerprint},
        "timings": {**timings, "chunk_seconds": gen.chunk_seconds, "generation_fps": gen.generation_fps,
                    "peak_kv_bytes": gen.peak_memory_bytes},
        "timeline": timeline,  # epoch seconds: generation's start and end, the commit (written just after)
        "replica": {"index": replica.index, "host": socket.gethostname(), "node_id": ctx.get_node_id(),
                    "actor_id": ctx.get_actor_id(), "device": str(replica.generator.device),
                    # on a CPU the latents' last bits depend on the intra-op thread count too
                    "cpu_threads": torch.get_num_threads()},
        "attempts": attempt,  # renders of it started, this one included
        # what the renders before this one cost: its own failures, replica deaths, failures of the cluster
        "failures": {k: history.get(k, 0) for k in ("attempts", "replica_deaths", "cluster_faults")},
        "cluster_reasons": history.get("cluster_reasons", []),
        "retrieval": {"bank_trace": gen.trace, "sma_trace": gen.sma_trace, "service": gen.retrieval},
        "quality": quality,
        "story": {"root": story["root"], "parent": story["parent"], "fork_chunk": story["fork_chunk"],
                  "prefix": story["prefix"], "chunks": {k: story[k] for k in ("shared", "replayed", "generated")}},
        "latents_url": replica.storage.url_for(latents_path(video_id)) if replica.config.save_latents else None,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def replica_options(use_gpu: bool, resources: dict | None = None) -> dict:
    """One GPU per replica, or one CPU; plus any custom resources (a node pool's marker, or
    the stand-in for a GPU in tests). SPREAD: replicas go to different nodes where they can,
    so one lost node takes few of them."""
    options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_gpus": 0, "num_cpus": 1}
    if resources:
        options["resources"] = dict(resources)
    return {**options, "scheduling_strategy": "SPREAD"}

