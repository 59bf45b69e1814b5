"""Batch generation: a manifest of scripts in, a captioned video dataset out.

    ray job submit --working-dir . -- python jobs/batch.py --scripts URL --output URL \
        [--model URL] [--preset P] [--replicas N | --min-replicas A --max-replicas B] [--memory-shards M]
        [--memory off|nam|nam+sma] [--fidelity reference|paper] [--clip-model URL] [--dino-model URL]
    python jobs/batch.py        # embedded default: local Ray, tiny preset, sample scripts, ./outputs

Output layout (system-design.md): videos/, records/ (the commit markers),
manifest/ and metrics/ Parquet (rebuilt from the records), errors.jsonl,
summary.json. Each record carries quality metrics (memflow.quality): temporal
flickering always, CLIP score and consistency with --clip-model / --dino-model.
Re-running the same command resumes: committed scripts are skipped.

Replicas form an elastic pool (cluster/pool.py): all of them are requested at once
(on an autoscaling cluster, that is what adds GPU nodes), work starts with the first
one up and spreads over the others as their nodes join; a lost node's scripts are
retried elsewhere; a replica that stalls is restarted (cluster/watchdog.py).

Exit status: 0 every script committed and no bad input; 1 partial success (some
input rejected or some scripts failed: see errors.jsonl); 2 failure (nothing
committed, or the job could not run or finish: the last line says why). Every
ending writes summary.json, a failed one included.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python jobs/batch.py` from a checkout, without installing
    sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError  # noqa: E402
from ray.util import metrics  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cluster.dataset import compact  # noqa: E402
from cluster.memory_service import shard_names, start_shards  # noqa: E402
from cluster.pool import ReplicaPool, capacity  # noqa: E402
from cluster.replica import GeneratorReplica, ReplicaConfig, record_path, replica_options, turn_holder  # noqa: E402
from cluster.scheduler import NoReplica, Scheduler, Task  # noqa: E402
from cluster.storage import Storage, s3_endpoint, storage_options  # noqa: E402
from cluster.watchdog import StallWatchdog  # noqa: E402
from jobs.manifest import count_manifest, iter_manifest  # noqa: E402
from memflow.attention import CHOICES as ATTENTION_CHOICES  # noqa: E402
from memflow.config import FIDELITIES, MEMORY_MODES, PRESETS  # noqa: E402
from memflow.quality import check_source  # noqa: E402
from memflow.script import Limits, Script, content_hash  # noqa: E402

log = logging.getLogger("memflow.batch")
SAMPLE_SCRIPTS = REPO / "examples" / "sample_scripts.jsonl"
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2
VERDICTS = {EXIT_OK: "success", EXIT_PARTIAL: "partial success", EXIT_FAILED: "failure"}


def _resources(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict) or not all(isinstance(k, str) and type(v) in (int, float) and v > 0
                                              for k, v in value.items()):
        raise ValueError(text)
    return value


_resources.__name__ = "JSON object of resource name to a positive amount"  # argparse's error names the type


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
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the transformer blocks on the replicas (auto: on GPUs)")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel on the replicas (auto: cuDNN, then FlashAttention/FA3, then efficient)")
    p.add_argument("--replicas", type=int, help="exactly N generator replicas (same as --min-replicas N --max-replicas N)")
    p.add_argument("--min-replicas", type=int,
                   help="replicas kept until the end for retries (default 1); idle ones beyond it are released "
                        "when the work runs out, so the autoscaler can take their nodes back")
    p.add_argument("--max-replicas", type=int,
                   help="replicas requested at most (default: GPUs the cluster has or its autoscaler can add; "
                        "1 on CPU); at most one per script of the manifest")
    p.add_argument("--replica-resources", type=_resources, metavar="JSON",
                   help='custom Ray resources each replica needs besides its GPU/CPU, e.g. \'{"L40S": 1}\' to keep '
                        "replicas on one node group")
    p.add_argument("--start-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long work may wait with no replica up (nodes joining, weights loading) before the "
                        "job gives up (default 1800)")
    p.add_argument("--stall-timeout", type=float, metavar="SECONDS",
                   help="restart a replica whose render makes no progress for this long (default: the larger of "
                        "600 s and 20x the slowest chunk seen)")
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
    p.add_argument("--max-seconds", type=float, help="longest script accepted, in seconds (default 600)")
    p.add_argument("--max-pixels", type=int,
                   help="largest resolution accepted, height x width (default: 4x the preset's, twice each side)")
    p.add_argument("--max-fps", type=int, help="highest fps accepted (default 60)")
    p.add_argument("--clip-model", help="CLIP folder/URL in Hugging Face layout (e.g. a save_pretrained of "
                   "openai/clip-vit-base-patch32): adds per-segment CLIP score and background consistency")
    p.add_argument("--dino-model", help="DINO folder/URL in Hugging Face layout (e.g. facebook/dino-vitb16): "
                   "adds subject consistency")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    args = p.parse_args(argv)
    for name in ("replicas", "min_replicas", "max_replicas", "in_flight", "max_attempts", "max_pixels", "max_fps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("start_timeout", "stall_timeout", "max_seconds"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        p.error("give either --replicas or --min-replicas/--max-replicas")
    if args.min_replicas and args.max_replicas and args.min_replicas > args.max_replicas:
        p.error("--min-replicas is larger than --max-replicas")
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
        self.reasons: collections.Counter = collections.Counter()  # of scripts that failed to render

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
        self.frames = self.committed = self.skipped = self.repeats = self.failed = 0
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

    def repeat_one(self) -> None:
        self.repeats += 1
        self._tick()

    def failed_one(self) -> None:
        self.failed += 1
        self.m_failed.inc()
        self._tick()

    def rejected_one(self) -> None:
        self.m_rejected.inc()
        self._tick()


def plan_replicas(args: argparse.Namespace, scripts: int | None) -> tuple[bool, int, int]:
    """(use a GPU each, replicas kept to the end, replicas requested). `--device auto` means
    GPU when the cluster has GPUs or its autoscaler can add them (GPU workers that start
    at zero): an autoscaling cluster must not fall back to one CPU replica."""
    gpus = capacity("GPU")
    use_gpu = args.device == "gpu" or (args.device == "auto" and gpus > 0)
    if args.replicas:
        return use_gpu, args.replicas, args.replicas
    fits = [capacity(name) // amount for name, amount in (args.replica_resources or {}).items()]
    fits += [gpus] if use_gpu else []
    most = args.max_replicas or max(1, args.min_replicas or 1, int(min(fits)) if fits else 1)
    least = min(args.min_replicas or 1, most)
    return use_gpu, least, max(least, min(most, scripts if scripts is not None else most))


def replica_config(args: argparse.Namespace, use_gpu: bool) -> ReplicaConfig:
    """What each replica is built from: plain values, no credential (replicas use their
    node's own: see cluster/replica.py)."""
    return ReplicaConfig(output=args.output, preset=args.preset, model=args.model, memory=args.memory,
                         fidelity=args.fidelity, endpoint_url=s3_endpoint(args.endpoint_url),
                         device="cuda" if use_gpu else "cpu", save_latents=args.save_latents, crf=args.crf,
                         clip_model=args.clip_model, dino_model=args.dino_model, compile=args.compile,
                         attention=args.attention)


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


def committed_digest(storage: Storage, video_id: str) -> str | None:
    """Content hash of the script committed under this id, or None if there is none."""
    try:
        record = json.loads(storage.read_text(record_path(video_id)))
    except FileNotFoundError:
        return None
    return record.get("script_sha256") or content_hash(Script.model_validate(record["script"]))


class BatchJob:
    """One run of the driver; whatever ends it, `summary()` reports what was done."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.started = time.time()
        self.storage: Storage | None = None
        self.errors = ErrorLog()
        self.progress: Progress | None = None
        self.dataset_rows: int | None = None  # rows compacted at the end, when the run gets there
        self.config: dict = {"preset": args.preset, "memory": args.memory, "fidelity": args.fidelity,
                             "model": args.model or "random", "in_flight": args.in_flight,
                             "max_attempts": args.max_attempts, "crf": args.crf, "clip_model": args.clip_model,
                             "dino_model": args.dino_model, "compile": args.compile, "attention": args.attention}
        self.pool: ReplicaPool | None = None
        self.owned: list = []  # memory shards this run starts, and kills when it ends
        self.own_replicas = True
        self.stop_on_sigterm = False  # main(): `ray job stop` ends the run like any other failure

    def execute(self, replicas: list | None = None) -> None:
        """Run the job; `replicas` (actor handles with `render` and `status`) replace the
        generator replicas, as the scheduler benchmark's sleeping ones do."""
        args = self.args
        self.storage = Storage(args.output, args.endpoint_url)
        scripts_options = storage_options(args.scripts, args.endpoint_url)
        total = count_manifest(args.scripts, scripts_options)  # a missing manifest fails before any actor starts
        for flag, url in (("--clip-model", args.clip_model), ("--dino-model", args.dino_model)):
            if url:  # so does a missing backbone; no credentials in URLs: they would land in every record
                storage_options(url)
                check_source(url, flag)
        limits = Limits.for_preset(PRESETS[args.preset], max_seconds=args.max_seconds, max_pixels=args.max_pixels,
                                   max_fps=args.max_fps)
        self.config["limits"] = {"max_seconds": limits.max_seconds, "max_pixels": limits.max_pixels,
                                 "max_fps": limits.max_fps}
        self.progress = Progress(total)
        init_ray(args.address)
        if self.stop_on_sigterm:  # after ray.init, whose own handler would abort the process at exit
            signal.signal(signal.SIGTERM, _stop)
        tasks = self._tasks(iter_manifest(args.scripts, scripts_options, limits=limits))
        first = next(tasks, None)  # nothing to render (a finished run resumed): no replica, no GPU node
        if first is not None:
            scheduler = self._start(replicas, total)
            for task, record in scheduler.run(itertools.chain([first], tasks)):
                if record is not None:
                    self.progress.committed_one(record)
                else:
                    reason = f"failed after {task.attempts} attempt(s)"
                    self.errors.add(line=task.line, id=task.video_id, reason=reason, attempts=task.errors)
                    self.errors.reasons[task.errors[-1] if task.errors else reason] += 1
                    self.progress.failed_one()
        self._release()
        self.progress.bar.close()
        self.dataset_rows = compact(self.storage)

    def _start(self, replicas: list | None, total: int | None) -> Scheduler:
        """Memory shards, the replica pool and the scheduler over it."""
        args = self.args
        use_gpu, keep, size = plan_replicas(args, total)
        shards = start_shards(args.memory_shards, f"memflow-memory-{self.run_id}") if args.memory != "off" else []
        self.owned += shards
        names = shard_names(len(shards), f"memflow-memory-{self.run_id}") or None
        config = replica_config(args, use_gpu)
        if replicas is None:
            options = replica_options(use_gpu, args.replica_resources)
            spawn = lambda i: GeneratorReplica.options(  # noqa: E731
                name=f"memflow-replica-{self.run_id}-{i}-{uuid.uuid4().hex[:4]}", **options).remote(config, names, i)
        else:
            size = keep = len(replicas)
            spawn, self.own_replicas = replicas.__getitem__, False
        self.pool = ReplicaPool(spawn, probe=lambda a: a.status.options(max_task_retries=-1).remote(),
                                size=size, keep=keep, max_starts=args.max_attempts)
        self.config.update(device="gpu" if use_gpu else "cpu", replicas=size, min_replicas=keep,
                           replica_resources=args.replica_resources, memory_shards=len(shards),
                           stall_timeout=args.stall_timeout)
        log.info("run %s: %d replica(s) requested (%d kept to the end) on %s%s, %d memory shard(s), preset %s, "
                 "memory %s (%s policy), output %s", self.run_id, size, keep, "GPU" if use_gpu else "CPU",
                 f" with {args.replica_resources}" if args.replica_resources else "", len(shards), args.preset,
                 args.memory, args.fidelity, self.storage)
        watchdog = StallWatchdog(lambda r: r.actor.status.remote(), limit_s=args.stall_timeout)
        return Scheduler(self.pool, lambda actor, t: actor.render.remote(t.script, t.video_id, t.attempts),
                         per_replica=args.in_flight, max_attempts=args.max_attempts, watchdog=watchdog,
                         start_timeout_s=args.start_timeout, generating=turn_holder)

    def _tasks(self, items):
        seen = SeenIds()
        for item in items:
            if not item.ok:
                self._reject(item, item.error)
                continue
            vid, digest = item.script.video_id, content_hash(item.script)
            first = seen.first(vid, item.line, digest)
            if first is not None:
                line, same = first
                if same:
                    self.progress.repeat_one()  # the same script again: rendered once
                else:
                    self._reject(item, f"duplicate id {vid!r}: line {line} has it with different content; "
                                       "give one of them another id")
                continue
            committed = committed_digest(self.storage, vid)
            if committed == digest:
                self.progress.skipped_one()
            elif committed is not None:
                self._reject(item, f"id {vid!r} was committed by an earlier run with different content "
                                   f"({record_path(vid)}); give this script another id, or delete that record to "
                                   "render it again")
            else:
                yield Task(vid, item.script.model_dump(mode="json"), item.line)

    def _reject(self, item, reason: str) -> None:
        self.errors.add(line=item.line, reason=reason, input=item.raw)
        self.progress.rejected_one()

    def _release(self) -> None:
        """Free the actors' CPUs/GPUs now: the process that called run() may go on to run more."""
        if self.pool is not None and self.own_replicas:
            self.pool.close()
        for actor in self.owned:
            ray.kill(actor)
        self.owned, self.own_replicas = [], False

    def summary(self, status: int, error: str | None = None) -> dict:
        p, wall = self.progress, time.time() - self.started
        committed, frames = (p.committed, p.frames) if p else (0, 0)
        served = sum(r.served for r in self.pool.replicas) if self.pool else 0
        return {
            "run_id": self.run_id, "scripts": self.args.scripts, "output": self.args.output,
            "status": VERDICTS[status], "exit_status": status, "error": error,
            "committed": committed, "skipped_already_committed": p.skipped if p else 0,
            "skipped_repeated_lines": p.repeats if p else 0, "failed": p.failed if p else 0,
            "rejected_input": self.errors.count - (p.failed if p else 0),
            "dataset_rows": self.dataset_rows, "frames": frames, "wall_seconds": wall,
            "fps": frames / max(wall, 1e-9), "videos_per_hour": committed / max(wall / 3600, 1e-9),
            "replicas_served": served, "config": self.config,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }

    def finish(self) -> int:
        """The normal ending: errors.jsonl and summary.json, exit status from the counts."""
        p = self.progress
        self.errors.upload(self.storage)
        done = p.committed + p.skipped + p.repeats
        status = EXIT_OK if self.errors.count == 0 and done > 0 else EXIT_FAILED if done == 0 else EXIT_PARTIAL
        why = None
        if status == EXIT_FAILED and self.errors.reasons:
            why = f"no script committed; {self.errors.reasons.most_common(1)[0][0]}"
        summary = self.summary(status, why)
        self.storage.write_json("summary.json", summary)
        rejected = summary["rejected_input"]
        print(f"{VERDICTS[status]}: {p.committed} committed, {p.skipped} already done, {p.failed} failed, "
              f"{rejected} rejected input line(s); {p.frames} frames in {summary['wall_seconds']:.0f} s "
              f"({summary['fps']:.1f} FPS); output {self.storage.url}" + (f"; {why}" if why else ""), flush=True)
        return status

    def fail(self, reason: str) -> str:
        """An ending the job did not plan: release what it holds, report what was done.
        Returns where summary.json went."""
        try:
            self._release()
        except Exception:  # Ray itself may be what failed
            pass
        if self.progress is not None:
            self.progress.bar.close()
        summary = self.summary(EXIT_FAILED, reason)
        if self.storage is not None:
            try:
                self.errors.upload(self.storage)
                self.storage.write_json("summary.json", summary)
                return self.storage.url_for("summary.json")
            except Exception as e:  # the output itself is unreachable: keep the summary here
                log.warning("could not write summary.json to %s: %s", self.args.output, explain(e))
        local = Path(tempfile.gettempdir()) / f"memflow-summary-{self.run_id}.json"
        local.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        return str(local)


def explain(e: BaseException) -> str:
    """One line a person can act on, for whatever ended the job."""
    text = " ".join(str(e).split())[:400] or type(e).__name__
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return (f"no object storage credentials ({type(e).__name__}: {text}): the driver uses its own credential "
                "chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role or service account) "
                "and replicas use their node's (see infra/)")
    if isinstance(e, PermissionError) or (isinstance(e, ClientError) and "AccessDenied" in text):
        return f"access denied ({text}): give the credentials in use read/write access to the manifest and output"
    if isinstance(e, (BotoCoreError, ConnectionError, TimeoutError)) or (isinstance(e, OSError)
                                                                         and not isinstance(e, FileNotFoundError)):
        return (f"object storage unreachable or failing ({type(e).__name__}: {text}); check --endpoint-url / "
                "AWS_ENDPOINT_URL and the store, then re-run the same command: it resumes")
    if isinstance(e, FileNotFoundError):
        return f"not found: {text}"
    if isinstance(e, NoReplica):
        return f"{text}; re-run the same command once that is fixed: it resumes"
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return "stopped by a signal; re-run the same command to resume"
    if isinstance(e, ValueError):
        return text
    return f"unexpected {type(e).__name__}: {text} (traceback above); re-run the same command to resume"


def run(args: argparse.Namespace, replicas: list | None = None, stop_on_sigterm: bool = False) -> int:
    """Run a batch job and return its exit status; see BatchJob.execute for `replicas`.
    `stop_on_sigterm` (main thread only): SIGTERM ends the run with exit 2 and a summary."""
    job = BatchJob(args)
    job.stop_on_sigterm = stop_on_sigterm
    try:
        job.execute(replicas)
    except BaseException as e:  # every ending reports: exit 2, one line, summary.json
        expected = isinstance(e, (ValueError, FileNotFoundError, PermissionError, NoCredentialsError,
                                  PartialCredentialsError, NoReplica, KeyboardInterrupt, SystemExit))
        if not expected:
            traceback.print_exc()
        reason = explain(e)
        where = job.fail(reason)
        print(f"failure: {reason} (summary: {where})", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return job.finish()


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return run(args, stop_on_sigterm=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
