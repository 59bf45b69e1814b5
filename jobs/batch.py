r"""Batch generation: a manifest of scripts in, a captioned video dataset out.

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

from cluster.dataset import BATCH, DatasetIndex  # noqa: E402
from cluster.memory_service import shard_names, start_shards  # noqa: E402
from cluster.pool import ReplicaPool, capacity  # noqa: E402
from cluster.replica import GeneratorReplica, replica_options, turn_holder  # noqa: E402
from cluster.settings import ReplicaSettings  # noqa: E402
from cluster.scheduler import InfraTimeout, NoReplica, Scheduler  # noqa: E402
from cluster.storage import Storage, s3_endpoint, storage_options  # noqa: E402
from cluster.watchdog import StallWatchdog  # noqa: E402
from jobs.manifest import count_manifest, iter_manifest  # noqa: E402
from jobs.settings import BatchSettings  # noqa: E402
from jobs.stories import TaskSource  # noqa: E402
from memflow.quality import check_source  # noqa: E402
from memflow.settings import Resolved, SettingsError  # noqa: E402

log = logging.getLogger("memflow.batch")
EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2
VERDICTS = {EXIT_OK: "success", EXIT_PARTIAL: "partial success", EXIT_FAILED: "failure"}


def parse_args(argv=None) -> Resolved:
    """The job's settings from the command line and --config FILE (jobs/settings.py)."""
    return BatchSettings.from_command_line(argv, description=__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)


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
    """The driver's view: a progress bar over the manifest's lines in the log, and Ray
    metrics for the dashboard. Counts are of videos (a branching line holds several)."""

    def __init__(self, total: int | None):
        self.bar = tqdm(total=total, unit="script", file=sys.stderr, mininterval=1.0, dynamic_ncols=False)
        self.t0 = time.perf_counter()
        self.frames = self.committed = self.skipped = self.repeats = self.failed = 0
        self.chunks = {"generated": 0, "replayed": 0, "in_videos": 0}  # chunks computed vs. in committed videos
        self.m_done = metrics.Counter("memflow_scripts_committed", "videos committed")
        self.m_failed = metrics.Counter("memflow_scripts_failed", "videos failed after all attempts")
        self.m_rejected = metrics.Counter("memflow_scripts_rejected", "manifest records rejected")
        self.m_fps = metrics.Gauge("memflow_job_fps", "video frames per second of wall time")

    def _tick(self) -> None:
        hours = (time.perf_counter() - self.t0) / 3600
        fps = self.frames / max(hours * 3600, 1e-9)
        self.bar.set_postfix_str(f"{self.committed / max(hours, 1e-9):.0f} videos/h, {fps:.1f} FPS, "
                                 f"{self.failed} failed", refresh=False)
        self.m_fps.set(fps)
        self.bar.update(1)

    def task_done(self, records: list[dict], chunks: dict) -> None:
        """A line rendered: its videos committed in this run, the chunks it computed."""
        for record in records:
            self.committed += 1
            self.frames += record["num_frames"]
            self.chunks["in_videos"] += record["num_chunks"]
            self.m_done.inc()
        self.chunks["generated"] += chunks["generated"]
        self.chunks["replayed"] += chunks["replayed"]
        self._tick()

    def skipped_videos(self, count: int, whole_line: bool) -> None:
        """Videos committed by an earlier run; the line is done when all of its are."""
        self.skipped += count
        if whole_line:
            self._tick()

    def repeat_one(self) -> None:
        self.repeats += 1
        self._tick()

    def failed_videos(self, count: int) -> None:
        self.failed += count
        self.m_failed.inc(count)
        self._tick()

    def rejected_one(self) -> None:
        self.m_rejected.inc()
        self._tick()


def plan_replicas(args: BatchSettings, scripts: int | None) -> tuple[bool, int, int]:
    """(use a GPU each, replicas kept to the end, replicas requested). `--device auto` means
    GPU when the cluster has GPUs or its autoscaler can add them (GPU workers that start
    at zero): an autoscaling cluster must not fall back to one CPU replica."""
    gpus = capacity("GPU")
    use_gpu = args.device == "cuda" or (args.device == "auto" and gpus > 0)
    if args.replicas:
        return use_gpu, args.replicas, args.replicas
    fits = [capacity(name) // amount for name, amount in (args.replica_resources or {}).items()]
    fits += [gpus] if use_gpu else []
    most = args.max_replicas or max(1, args.min_replicas or 1, int(min(fits)) if fits else 1)
    least = min(args.min_replicas or 1, most)
    return use_gpu, least, max(least, min(most, scripts if scripts is not None else most))


def replica_config(args: BatchSettings, use_gpu: bool) -> ReplicaSettings:
    """What each replica is built from: the job's replica settings, the device and the S3
    endpoint resolved (no credential: replicas use their node's own, see cluster/replica.py)."""
    return args.pick(ReplicaSettings, device="cuda" if use_gpu else "cpu", endpoint_url=s3_endpoint(args.endpoint_url))


class BatchJob:
    """One run of the driver; whatever ends it, `summary()` reports what was done."""

    def __init__(self, config: Resolved):
        self.resolved = config
        self.args = args = config.settings
        self.run_id = uuid.uuid4().hex[:8]
        self.started = time.time()
        self.storage: Storage | None = None
        self.errors = ErrorLog()
        self.progress: Progress | None = None
        self.dataset_rows: int | None = None  # rows the manifest table holds at the end, when the run gets there
        self.dataset_versions: dict | None = None  # the table versions this run wrote last ("as of run N")
        self.index: DatasetIndex | None = None
        self.rows: list[dict] = []  # dataset rows of videos committed, not yet in the tables
        self.plan: dict = {}  # what the run derived from the settings: limits, device, replicas, shards
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
        limits = args.limits(args.preset)
        self.plan["limits"] = {"max_seconds": limits.max_seconds, "max_pixels": limits.max_pixels,
                               "max_fps": limits.max_fps}
        self.progress = Progress(total)
        committed = self._open_index()
        init_ray(args.address)
        if self.stop_on_sigterm:  # after ray.init, whose own handler would abort the process at exit
            signal.signal(signal.SIGTERM, _stop)
        source = TaskSource(iter_manifest(args.scripts, scripts_options, limits=limits), self.storage, args,
                            reject=self._reject, skipped=self.progress.skipped_videos,
                            repeated=self.progress.repeat_one, committed=committed)
        first = source.next()  # nothing to render (a finished run resumed): no replica, no GPU node
        if first is not None:
            source.ready.appendleft(first)
            scheduler = self._start(replicas, total)
            for task, result in scheduler.run(source):
                self._ended(task, result, source.in_flight.get(task.video_id, set()))
                source.finished(task, result)
        self._release()
        self.progress.bar.close()
        self.dataset_versions = self.index.add(self.rows)
        self.rows = []
        self.dataset_rows = len(committed)

    def _open_index(self):
        """The dataset tables (migrated if the output is indexed the old way) and what is
        committed: what they hold, made to agree with the records (the committed records
        they miss, as after a driver that died before its update, are added at the end;
        the rows whose records were deleted go now)."""
        self.index = DatasetIndex(self.storage, self.args.endpoint_url)
        if self.index.migrate():
            log.info("migrated the dataset index of %s to Delta tables (manifest/, metrics/)", self.storage)
        committed = self.index.committed()
        missing, gone = self.index.reconcile(committed)
        if gone:
            self.index.remove(gone)
            for vid in gone:
                committed.discard(vid)
        self.rows = [self.index.rows(r) for r in missing]
        for row in self.rows:
            committed.add(row["manifest"]["id"], row["manifest"]["script_sha256"])
        return committed

    def _ended(self, task, result: dict | None, videos: set[str]) -> None:
        """A line rendered (its videos not committed before this run: `videos`) or given up."""
        args = self.args
        if result is not None:
            new = [r for r in result["records"] if r["id"] in videos]
            self.progress.task_done(new, result["chunks"])
            self.rows += [self.index.rows(r) for r in new]
            if len(self.rows) >= BATCH:  # the index grows during long runs too
                self.dataset_versions = self.index.add(self.rows)
                self.rows = []
            return
        reason = (f"failed after {task.attempts} attempt(s)" if task.attempts >= args.max_attempts else
                  f"failed: its replica died {task.deaths} time(s) while rendering it"
                  if task.deaths >= args.max_replica_deaths else "failed: no replica could render it")
        self.errors.add(line=task.line, id=task.video_id, videos=sorted(videos), reason=reason,
                        attempts=task.errors, history=task.history())
        self.errors.reasons[task.errors[-1] if task.errors else reason] += 1
        self.progress.failed_videos(len(videos))

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
                                size=size, keep=keep, max_starts=args.max_attempts, generating=turn_holder)
        self.plan.update(device="gpu" if use_gpu else "cpu", replicas=size, min_replicas=keep,
                         memory_shards=len(shards))
        log.info("run %s: %d replica(s) requested (%d kept to the end) on %s%s, %d memory shard(s), preset %s, "
                 "memory %s (%s policy), output %s", self.run_id, size, keep, "GPU" if use_gpu else "CPU",
                 f" with {args.replica_resources}" if args.replica_resources else "", len(shards), args.preset,
                 args.memory, args.fidelity, self.storage)
        watchdog = StallWatchdog(lambda r: r.actor.status.remote(), limit_s=args.stall_timeout)
        return Scheduler(self.pool, lambda actor, t: actor.render.remote({**t.script, "history": t.history()},
                                                                         t.video_id, t.calls),
                         per_replica=args.in_flight, max_attempts=args.max_attempts, watchdog=watchdog,
                         start_timeout_s=args.start_timeout, max_replica_deaths=args.max_replica_deaths,
                         infra_timeout_s=args.infra_timeout)

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
            "dataset_rows": self.dataset_rows, "dataset_versions": self.dataset_versions,
            "frames": frames, "wall_seconds": wall,
            # chunks computed (generated once, shared by branches; replayed from saved latents) vs. the
            # chunks the committed videos contain: the saving of stories
            "chunks": dict(p.chunks) if p else None,
            "fps": frames / max(wall, 1e-9), "videos_per_hour": committed / max(wall / 3600, 1e-9),
            "replicas_served": served, "config": self.resolved.settings.model_dump(mode="json"),
            "config_sources": self.resolved.sources, "plan": self.plan,
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
    if isinstance(e, InfraTimeout):
        return f"{text}; the cluster did not recover within --infra-timeout: re-run the same command once it has"
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return "stopped by a signal; re-run the same command to resume"
    if isinstance(e, ValueError):
        return text
    return f"unexpected {type(e).__name__}: {text} (traceback above); re-run the same command to resume"


def run(config: BatchSettings | Resolved, replicas: list | None = None, stop_on_sigterm: bool = False) -> int:
    """Run a batch job and return its exit status: the Python entry (jobs/regression.py calls
    it with settings it built). See BatchJob.execute for `replicas`. `stop_on_sigterm` (main
    thread only): SIGTERM ends the run with exit 2 and a summary."""
    job = BatchJob(config if isinstance(config, Resolved) else Resolved.of(config))
    job.stop_on_sigterm = stop_on_sigterm
    try:
        job.execute(replicas)
    except BaseException as e:  # every ending reports: exit 2, one line, summary.json
        expected = isinstance(e, (ValueError, FileNotFoundError, PermissionError, NoCredentialsError,
                                  PartialCredentialsError, NoReplica, InfraTimeout, KeyboardInterrupt, SystemExit))
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
    try:
        args = parse_args(argv)
    except SettingsError as e:  # before anything starts
        print(f"failure: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return run(args, stop_on_sigterm=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
