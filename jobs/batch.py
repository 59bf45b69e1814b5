"""Batch generation: a manifest of scripts in, a captioned video dataset out.

    ray job submit --working-dir . -- python jobs/batch.py --scripts URL --output URL \
        [--model URL] [--preset P] [--replicas N] [--memory-shards M] [--clip-model URL] [--dino-model URL]
    python jobs/batch.py        # embedded default: local Ray, tiny preset, sample scripts, ./outputs

Output layout (system-design.md): videos/, records/ (the commit markers),
manifest/ and metrics/ Parquet (rebuilt from the records), errors.jsonl,
summary.json. Each record carries quality metrics (memflow.quality): temporal
flickering always, CLIP score and consistency with --clip-model / --dino-model.
Re-running the same command resumes: committed scripts are skipped.
Exit status: 0 every script committed and no bad input, 1 partial success (some
input rejected or some scripts failed), 2 failure (nothing committed, or the job
could not run).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python jobs/batch.py` from a checkout, without installing
    sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from ray.util import metrics  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.dataset import compact  # noqa: E402
from cluster.memory_service import start_shards  # noqa: E402
from cluster.replica import GeneratorReplica, ReplicaConfig, record_path, replica_options  # noqa: E402
from cluster.scheduler import Scheduler, Task  # noqa: E402
from cluster.storage import Storage, StorageEnv, storage_options  # noqa: E402
from jobs.manifest import count_manifest, iter_manifest  # noqa: E402
from memflow.config import FIDELITIES, MEMORY_MODES, PRESETS  # noqa: E402
from memflow.quality import check_source  # noqa: E402

log = logging.getLogger("memflow.batch")
SAMPLE_SCRIPTS = REPO / "examples" / "sample_scripts.jsonl"
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", default=str(SAMPLE_SCRIPTS), help="manifest URL: .jsonl, .txt, .parquet (any fsspec URL)")
    p.add_argument("--output", default="./outputs", help="output prefix URL (file path, s3://bucket/prefix, ...)")
    p.add_argument("--model", help="weights directory/URL (diffusers Wan layout, optional MemFlow base.pt + lora.pt)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--memory", default="nam", choices=MEMORY_MODES,
                   help="off, nam (default: what the checkpoint was trained with) or nam+sma (faster)")
    p.add_argument("--fidelity", default="reference", choices=FIDELITIES,
                   help="memory policy: reference (default, what the released checkpoint runs with) or paper")
    p.add_argument("--replicas", type=int, help="generator replicas (default: GPUs in the cluster, else 1)")
    p.add_argument("--memory-shards", type=int, default=1, help="memory bank service shards (0: in-process ranking)")
    p.add_argument("--in-flight", type=int, default=2, help="scripts queued per replica (default 2)")
    p.add_argument("--max-attempts", type=int, default=3, help="render attempts per script (default 3)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else env MEMFLOW_S3_ENDPOINT / AWS_ENDPOINT_URL)")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="replica placement: one GPU each, or CPU (auto: GPU when the cluster has one)")
    p.add_argument("--save-latents", action="store_true", help="also write latents/<id>.safetensors")
    p.add_argument("--crf", type=int, default=18,
                   help="H.264 quality, 0-51 (default 18). 0 is lossless and bit-reproducible: x264 is not "
                        "at other settings, so regression renders use 0")
    p.add_argument("--clip-model", help="CLIP folder/URL in Hugging Face layout (e.g. a save_pretrained of "
                   "openai/clip-vit-base-patch32): adds per-segment CLIP score and background consistency")
    p.add_argument("--dino-model", help="DINO folder/URL in Hugging Face layout (e.g. facebook/dino-vitb16): "
                   "adds subject consistency")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    args = p.parse_args(argv)
    for name in ("replicas", "in_flight", "max_attempts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.crf <= 51:
        p.error("--crf must be between 0 (lossless) and 51")
    if args.memory_shards < 0:
        p.error("--memory-shards must be >= 0")
    return args


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # a private local cluster, reachable only from this machine
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)


class ErrorLog:
    """errors.jsonl, spooled to a local file (bounded memory) and uploaded whole."""

    def __init__(self):
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.count = 0

    def add(self, **entry) -> None:
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1

    def upload(self, storage: Storage) -> None:
        self.file.seek(0)
        storage.write_text("errors.jsonl", self.file.read())
        self.file.seek(0, 2)


class Progress:
    """The driver's view: a progress bar in the log and Ray metrics for the dashboard."""

    def __init__(self, total: int | None):
        self.bar = tqdm(total=total, unit="script", file=sys.stderr, mininterval=1.0, dynamic_ncols=False)
        self.t0 = time.perf_counter()
        self.frames = self.committed = self.skipped = self.failed = 0
        self.m_done = metrics.Counter("memflow_scripts_committed", "scripts committed")
        self.m_failed = metrics.Counter("memflow_scripts_failed", "scripts failed after all attempts")
        self.m_rejected = metrics.Counter("memflow_scripts_rejected", "manifest records rejected")
        self.m_fps = metrics.Gauge("memflow_job_fps", "video frames per second of wall time")

    def _tick(self) -> None:
        hours = (time.perf_counter() - self.t0) / 3600
        fps = self.frames / max(hours * 3600, 1e-9)
        self.bar.set_postfix_str(f"{self.committed / max(hours, 1e-9):.0f} videos/h, {fps:.1f} FPS, "
                                 f"{self.failed} failed", refresh=False)
        self.m_fps.set(fps)
        self.bar.update(1)

    def committed_one(self, record: dict) -> None:
        self.committed += 1
        self.frames += record["num_frames"]
        self.m_done.inc()
        self._tick()

    def skipped_one(self) -> None:
        self.skipped += 1
        self._tick()

    def failed_one(self) -> None:
        self.failed += 1
        self.m_failed.inc()
        self._tick()

    def rejected_one(self) -> None:
        self.m_rejected.inc()
        self._tick()


def run(args: argparse.Namespace, replicas: list | None = None) -> int:
    """Run a batch job; `replicas` (actor handles with `render`) replace the generator
    replicas, as the scheduler benchmark's sleeping ones do."""
    started = time.time()
    storage = Storage(args.output, args.endpoint_url)
    scripts_options = storage_options(args.scripts, args.endpoint_url)
    total = count_manifest(args.scripts, scripts_options)  # a missing manifest fails before any actor starts
    for flag, url in (("--clip-model", args.clip_model), ("--dino-model", args.dino_model)):
        if url:  # so does a missing backbone; no credentials in URLs: they would land in every record
            storage_options(url)
            check_source(url, flag)
    init_ray(args.address)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = args.device == "gpu" or (args.device == "auto" and gpus > 0)
    replicas_n = args.replicas or (int(gpus) if use_gpu else 1)
    run_id = uuid.uuid4().hex[:8]
    shards = start_shards(args.memory_shards, f"memflow-memory-{run_id}") if args.memory != "off" else []
    config = ReplicaConfig(output=args.output, preset=args.preset, model=args.model, memory=args.memory,
                           fidelity=args.fidelity,
                           endpoint_url=args.endpoint_url, device="cuda" if use_gpu else "cpu",
                           storage_env=StorageEnv(), save_latents=args.save_latents, crf=args.crf,
                           clip_model=args.clip_model, dino_model=args.dino_model)
    owned = list(shards)  # actors this run starts, and kills when it ends
    if replicas is None:
        replicas = [GeneratorReplica.options(name=f"memflow-replica-{run_id}-{i}", **replica_options(use_gpu))
                    .remote(config, shards or None, i) for i in range(replicas_n)]
        owned += replicas
    replicas_n = len(replicas)
    log.info("run %s: %d replica(s) on %s, %d memory shard(s), preset %s, memory %s (%s policy), output %s",
             run_id, replicas_n, "GPU" if use_gpu else "CPU", len(shards), args.preset, args.memory, args.fidelity,
             storage)

    errors = ErrorLog()
    progress = Progress(total)
    active: dict[str, int] = {}  # video id -> manifest line, for scripts in flight

    def tasks():
        for item in iter_manifest(args.scripts, scripts_options):
            if not item.ok:
                errors.add(line=item.line, reason=item.error, input=item.raw)
                progress.rejected_one()
                continue
            vid = item.script.video_id
            if vid in active:
                errors.add(line=item.line, reason=f"duplicate id {vid!r}: line {active[vid]} has it", input=item.raw)
                progress.rejected_one()
                continue
            if storage.exists(record_path(vid)):
                progress.skipped_one()
                continue
            active[vid] = item.line
            yield Task(vid, item.script.model_dump(mode="json"), item.line)

    scheduler = Scheduler(replicas, lambda r, t: r.render.remote(t.script, t.video_id, t.attempts),
                          probe=lambda r: r.status.options(max_task_retries=-1).remote(),
                          per_replica=args.in_flight, max_attempts=args.max_attempts)
    try:
        for task, record in scheduler.run(tasks()):
            active.pop(task.video_id, None)
            if record is not None:
                progress.committed_one(record)
            else:
                errors.add(line=task.line, id=task.video_id, reason=f"failed after {task.attempts} attempts",
                           attempts=task.errors)
                progress.failed_one()
    finally:  # free their CPUs/GPUs now: the process that called run() may go on to run more
        for actor in owned:
            ray.kill(actor)
    progress.bar.close()

    rows = compact(storage)
    errors.upload(storage)
    wall = time.time() - started
    rejected = errors.count - progress.failed
    summary = {
        "run_id": run_id, "scripts": args.scripts, "output": storage.url,
        "committed": progress.committed, "skipped_already_committed": progress.skipped,
        "failed": progress.failed, "rejected_input": rejected, "dataset_rows": rows,
        "frames": progress.frames, "wall_seconds": wall, "fps": progress.frames / max(wall, 1e-9),
        "videos_per_hour": progress.committed / max(wall / 3600, 1e-9),
        "config": {"preset": args.preset, "memory": args.memory, "fidelity": args.fidelity,
                   "model": args.model or "random",
                   "replicas": replicas_n, "device": "gpu" if use_gpu else "cpu", "memory_shards": len(shards),
                   "in_flight": args.in_flight, "max_attempts": args.max_attempts, "crf": args.crf,
                   "clip_model": args.clip_model, "dino_model": args.dino_model},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    storage.write_json("summary.json", summary)
    done = progress.committed + progress.skipped
    status = EXIT_OK if errors.count == 0 and done > 0 else EXIT_FAILED if done == 0 else EXIT_PARTIAL
    verdict = {EXIT_OK: "success", EXIT_PARTIAL: "partial success", EXIT_FAILED: "failure"}[status]
    print(f"{verdict}: {progress.committed} committed, {progress.skipped} already done, {progress.failed} failed, "
          f"{rejected} rejected input line(s); {progress.frames} frames in {wall:.0f} s "
          f"({summary['fps']:.1f} FPS); output {storage.url}", flush=True)
    return status


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"failure: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
