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
from dataclasses import dataclass

import ray
from ray.experimental import internal_kv
from ray.util import metrics
from safetensors.torch import save

from memflow.pipeline import MemFlowGenerator
from memflow.quality import QualityMeter, load_clip, load_dino
from memflow.script import Script, content_hash
from memflow.video import write_mp4

from .memory_service import MemoryServiceClient
from .storage import Storage

log = logging.getLogger(__name__)

TMP_PREFIX = "memflow-replica-"  # + pid: a folder of a replica that is gone can be told apart
HANG_ENV = "MEMFLOW_TEST_HANG"  # test-only fault injection, see _hang_for_tests


@dataclass(frozen=True)
class ReplicaConfig:
    output: str
    preset: str = "tiny"
    model: str | None = None
    memory: str = "nam"
    fidelity: str = "reference"  # the memory policy (memflow/memory/policy.py)
    endpoint_url: str | None = None  # the driver's resolved S3 endpoint (not a credential)
    device: str | None = None
    save_latents: bool = False  # latents/<id>.safetensors too (regression runs compare them)
    crf: int = 18  # H.264 quality; 0 is lossless, the only setting whose pixels are reproducible run to run
    clip_model: str | None = None  # CLIP folder/URL (HF layout): CLIP score, background consistency
    dino_model: str | None = None  # DINO folder/URL (HF layout): subject consistency
    compile: str = "auto"  # torch.compile the blocks: auto (on GPUs), on, off
    attention: str = "auto"  # SDPA kernel (memflow/attention.py)
    pipelined: bool = True  # overlap one script's finishing with the next one's generation


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


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"status": 1, "render": 2})
class GeneratorReplica:
    def __init__(self, config: ReplicaConfig, shards: list[str] | None = None, index: int = 0):
        from memflow.config import get_preset

        self.config, self.index = config, index
        self._lock = threading.Lock()
        self._gpu = threading.Lock()  # one script generates at a time (GpuTurn)
        self._actor_id = ray.get_runtime_context().get_actor_id()
        post_turn(self._actor_id, None)  # a turn the previous process held died with it
        # video/stage/chunk: the script generating; finishing: the one being decoded, encoded, uploaded
        self._status = {"replica": index, "node": ray.get_runtime_context().get_node_id(), "video": None,
                        "stage": "starting", "chunk": 0, "chunks": 0, "encoded": 0, "finishing": None,
                        "ticks": 0, "slowest_chunk_s": 0.0, "storage_retries": 0}
        clean_stale_tmp()
        try:
            self.storage = Storage(config.output, config.endpoint_url)
            self.storage.on_retry = lambda: self._update(storage_retries=self._status["storage_retries"] + 1)
            self.storage.exists("records")  # fail here, once, when this node cannot reach the output
            preset = get_preset(config.preset).with_memory(mode=config.memory, fidelity=config.fidelity)
            self.generator = MemFlowGenerator.from_preset(
                preset, model=config.model, device=config.device, attention=config.attention,
                compile={"auto": None, "on": True, "off": False}[config.compile])
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
            return dict(self._status)

    def _update(self, **changes) -> None:
        """Change the status; every change is progress for the stall watchdog."""
        with self._lock:
            self._status.update(changes)
            self._status["ticks"] += 1

    def _progress(self, video_id: str, attempt: int, event) -> None:
        tags = {"replica": str(self.index)}
        self._chunks.inc(1, tags)
        self._chunk_s.observe(event.seconds, tags)
        self._update(chunk=event.chunk + 1, chunks=event.num_chunks,
                     slowest_chunk_s=max(self._status["slowest_chunk_s"], event.seconds))
        if event.chunk == 0:
            _hang_for_tests(video_id, attempt)

    def _counted(self, frames):
        for n, frame in enumerate(frames, 1):
            yield frame
            self._update(encoded=n)

    @ray.method(concurrency_group="render")
    def render(self, script_json: dict, video_id: str, attempt: int) -> dict:
        """Render one script and commit it; returns its record. Two calls run at once:
        one generates while the other finishes (see the module docstring)."""
        self._update()  # the status keeps naming the script generating, if one is
        if self.storage.exists(record_path(video_id)):
            return json.loads(self.storage.read_text(record_path(video_id)))
        script = Script.model_validate(script_json)
        plan = script.plan(self.generator.memory.frames_per_chunk)
        meter = QualityMeter([(s.video_start, s.video_end, s.prompt) for s in plan.segments], script.fps,
                             clip=self.clip, dino=self.dino)
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp, \
                GpuTurn(self._gpu, lambda vid: post_turn(self._actor_id, vid), video_id,
                        pipelined=self.config.pipelined) as turn:
            local = os.path.join(tmp, "video.mp4")
            t0 = time.perf_counter()
            timeline = {"generate_start": time.time()}  # epoch seconds: when the GPU was this script's
            self._update(video=video_id, stage="generate", chunk=0, chunks=plan.num_chunks, encoded=0)

            def chunk_done(event):
                self._progress(video_id, attempt, event)
                if event.chunk + 1 == event.num_chunks:
                    timeline["generate_end"] = time.time()
                if turn.after_chunk(event):  # the GPU goes to the next script; this one finishes
                    self._update(video=None, stage="idle", finishing=f"decode of {video_id}")

            try:
                gen = self.generator.generate(
                    script, video_id=video_id, ranker=self.ranker, on_chunk=chunk_done,
                    frames_to=lambda frames: write_mp4(self._counted(meter.observe(frames)), local,
                                                       fps=script.fps, crf=self.config.crf))
                t1 = time.perf_counter()
                # the status's video/stage belong to the script generating; a finishing one has its own
                self._update(**({"stage": "upload"} if turn.held else {"finishing": f"upload of {video_id}"}))
                self.storage.upload_file(local, video_path(video_id))
                if self.config.save_latents:
                    self.storage.write_bytes(latents_path(video_id), save({"latents": gen.latents.contiguous()}))
                t2 = time.perf_counter()
                timeline["committed"] = time.time()
                record = build_record(self, script, gen, video_id, gen.decoded, attempt, meter.result(), timeline,
                                      # decoding and encoding overlap generation: decode_encode_s is what
                                      # they took after the last chunk; generate_wall_s covers all three
                                      timings={"generate_s": gen.seconds, "decode_encode_s": gen.decode_tail_seconds,
                                               "generate_wall_s": t1 - t0, "upload_s": t2 - t1})
                self.storage.write_json(record_path(video_id), record)  # the commit
                return record
            finally:
                if turn.held:
                    self._update(video=None, stage="idle")
                self._update(finishing=None)


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


def _hang_for_tests(video_id: str, attempt: int) -> None:
    """Test-only fault injection: with MEMFLOW_TEST_HANG="<video id>[:<attempts>],..." in a
    replica's environment (a node's env, or a job's runtime_env), the render of that video
    hangs after its first chunk, as on a stuck CUDA call, on every attempt or on the first
    <attempts> ones. The tests and benchmarks/chaos.py use it to exercise the stall watchdog."""
    for entry in filter(None, os.environ.get(HANG_ENV, "").split(",")):
        vid, _, attempts = entry.partition(":")
        if vid == video_id and (not attempts or attempt <= int(attempts)):
            while True:
                time.sleep(3600)


def build_record(replica, script: Script, gen, video_id: str, frames: int, attempt: int, quality: dict,
                 timeline: dict, timings: dict) -> dict:
    """Everything a dataset user needs about one video, captions with frame ranges and
    quality metrics included (`quality`: memflow.quality.QualityMeter.result())."""
    plan = gen.plan
    height, width = script.resolution or (replica.generator.preset.height, replica.generator.preset.width)
    ctx = ray.get_runtime_context()
    return {
        "id": video_id,
        "video": video_path(video_id),
        "video_url": replica.storage.url_for(video_path(video_id)),
        "script": script.model_dump(mode="json"),
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
        "model": {"preset": replica.config.preset, "weights": replica.config.model or "random",
                  "memory": replica.config.memory, "fidelity": replica.generator.fidelity,
                  "fingerprint": replica.generator.config_fingerprint},
        "timings": {**timings, "chunk_seconds": gen.chunk_seconds, "generation_fps": gen.generation_fps,
                    "peak_kv_bytes": gen.peak_memory_bytes},
        "timeline": timeline,  # epoch seconds: generation's start and end, the commit (written just after)
        "replica": {"index": replica.index, "host": socket.gethostname(), "node_id": ctx.get_node_id(),
                    "actor_id": ctx.get_actor_id(), "device": str(replica.generator.device)},
        "attempts": attempt,
        "retrieval": {"bank_trace": gen.trace, "sma_trace": gen.sma_trace, "service": gen.retrieval},
        "quality": quality,
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

