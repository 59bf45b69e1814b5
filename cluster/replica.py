"""Generator replicas: one Ray actor per GPU, weights loaded once, script after script.

A render commits in this order: mp4 uploaded to `videos/<id>.mp4`, then the record
`records/<id>.json` (the commit marker, one atomic PUT). A replica killed at any
point before the record leaves no committed trace; a retry overwrites the orphan
video. A retry of a script whose record already exists (the replica died after
committing, before answering) returns that record instead of rendering again, so
no script is committed twice.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import ray
from ray.util import metrics
from safetensors.torch import save

from memflow.pipeline import MemFlowGenerator
from memflow.quality import QualityMeter, load_clip, load_dino
from memflow.script import Script
from memflow.video import write_mp4

from .memory_service import MemoryServiceClient
from .storage import Storage, StorageEnv


@dataclass(frozen=True)
class ReplicaConfig:
    output: str
    preset: str = "tiny"
    model: str | None = None
    memory: str = "nam"
    fidelity: str = "reference"  # the memory policy (memflow/memory/policy.py)
    endpoint_url: str | None = None
    device: str | None = None
    storage_env: StorageEnv | None = None  # the driver's, applied before anything is read or written
    save_latents: bool = False  # latents/<id>.safetensors too (regression runs compare them)
    crf: int = 18  # H.264 quality; 0 is lossless, the only setting whose pixels are reproducible run to run
    clip_model: str | None = None  # CLIP folder/URL (HF layout): CLIP score, background consistency
    dino_model: str | None = None  # DINO folder/URL (HF layout): subject consistency


def record_path(video_id: str) -> str:
    return f"records/{video_id}.json"


def video_path(video_id: str) -> str:
    return f"videos/{video_id}.mp4"


def latents_path(video_id: str) -> str:
    return f"latents/{video_id}.safetensors"


@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"status": 1})
class GeneratorReplica:
    def __init__(self, config: ReplicaConfig, shards: list | None = None, index: int = 0):
        from memflow.config import get_preset

        t0 = time.perf_counter()
        if config.storage_env is not None:
            config.storage_env.apply()
        self.config, self.index = config, index
        preset = get_preset(config.preset).with_memory(mode=config.memory, fidelity=config.fidelity)
        self.generator = MemFlowGenerator.from_preset(preset, model=config.model, device=config.device)
        self.storage = Storage(config.output, config.endpoint_url)
        device = self.generator.device
        self.clip = load_clip(config.clip_model, device) if config.clip_model else None
        self.dino = load_dino(config.dino_model, device) if config.dino_model else None
        self.ranker = MemoryServiceClient(shards) if shards else None
        self.load_seconds = time.perf_counter() - t0
        self._status = {"replica": index, "video": None, "chunk": 0, "chunks": 0}
        self._lock = threading.Lock()
        self._chunks = metrics.Counter("memflow_chunks_generated", "latent chunks generated", tag_keys=("replica",))
        self._chunk_s = metrics.Histogram("memflow_chunk_seconds", "seconds per chunk",
                                          boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=("replica",))

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        """What this replica is rendering now (answers while a render runs)."""
        with self._lock:
            return dict(self._status)

    def _progress(self, video_id: str, event) -> None:
        tags = {"replica": str(self.index)}
        self._chunks.inc(1, tags)
        self._chunk_s.observe(event.seconds, tags)
        with self._lock:
            self._status.update(video=video_id, chunk=event.chunk + 1, chunks=event.num_chunks)

    def render(self, script_json: dict, video_id: str, attempt: int) -> dict:
        """Render one script and commit it; returns its record."""
        if self.storage.exists(record_path(video_id)):
            return json.loads(self.storage.read_text(record_path(video_id)))
        script = Script.model_validate(script_json)
        t0 = time.perf_counter()
        with self._lock:
            self._status.update(video=video_id, chunk=0, chunks=script.plan().num_chunks)
        try:
            gen = self.generator.generate(script, video_id=video_id, ranker=self.ranker,
                                          on_chunk=lambda e: self._progress(video_id, e))
            with tempfile.TemporaryDirectory(prefix="memflow-") as tmp:
                local = os.path.join(tmp, "video.mp4")
                t1 = time.perf_counter()
                meter = QualityMeter([(s.video_start, s.video_end, s.prompt) for s in gen.plan.segments], gen.fps,
                                     clip=self.clip, dino=self.dino)
                frames = write_mp4(meter.observe(self.generator.frames(gen)), local, fps=gen.fps,
                                   crf=self.config.crf)
                t2 = time.perf_counter()
                self.storage.upload_file(local, video_path(video_id))
                if self.config.save_latents:
                    self.storage.write_bytes(latents_path(video_id), save({"latents": gen.latents.contiguous()}))
                t3 = time.perf_counter()
            record = build_record(self, script, gen, video_id, frames, attempt, meter.result(),
                                  timings={"generate_s": t1 - t0, "decode_encode_s": t2 - t1, "upload_s": t3 - t2})
            self.storage.write_json(record_path(video_id), record)  # the commit
            return record
        finally:
            with self._lock:
                self._status.update(video=None, chunk=0, chunks=0)


def build_record(replica, script: Script, gen, video_id: str, frames: int, attempt: int, quality: dict,
                 timings: dict) -> dict:
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
        "replica": {"index": replica.index, "host": socket.gethostname(), "node_id": ctx.get_node_id(),
                    "actor_id": ctx.get_actor_id(), "device": str(replica.generator.device)},
        "attempts": attempt,
        "retrieval": {"bank_trace": gen.trace, "sma_trace": gen.sma_trace, "service": gen.retrieval},
        "quality": quality,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def replica_options(gpus_available: bool) -> dict:
    """One GPU per replica when the cluster has GPUs; one CPU otherwise."""
    return {"num_gpus": 1, "num_cpus": 1} if gpus_available else {"num_gpus": 0, "num_cpus": 1}

