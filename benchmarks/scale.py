"""The dataset index and the driver at scale, on a local S3 server (moto), no rendering.

1. A dataset of --records committed videos (synthetic records, tests/records.py) indexed
   in the Delta tables as --runs earlier runs left them (one commit, one file per run and
   table, compacted once there are many), and --new more committed by a driver that died before its index update. Then,
   time and S3 requests counted at the server:
   - the recovery: the next run's start-up finds the records the tables miss in its
     listing of records/, reads each, merges them;
   - that run's own index update, for the --new videos it commits: their rows (made from
     the records its replicas returned) merged into both tables by id, one commit each;
   - a full rebuild from every record, which is what the index cost at the end of every
     run before it was a table.
2. The driver's start-up on a --lines manifest (--records of its lines committed already,
   with the content they were committed with; a tenth of the others repeated): the
   committed ids read from the table, the records listing, then every line parsed and
   checked for duplicate ids and against what is committed, each task ended as rendered
   (the driver adds its videos to what is committed), as the driver does over a run.
   Seconds and peak memory (RSS of a child process that does only this).

moto lists a bucket by sorting every key for each page of 1,000 (an S3 server answers a
page in time that does not grow with the bucket): listings here cost more than on S3.

    python benchmarks/scale.py                                    # 100,000 videos + 1,000; 1,000,000 lines
    python benchmarks/scale.py --records 10000 --new 100 --lines 100000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BUCKET = "scale"


class CountingServer:
    """moto's S3 server on 127.0.0.1, counting the requests it answers."""

    def __init__(self):
        import werkzeug.serving
        from moto.server import ThreadedMotoServer

        self.count, lock = 0, threading.Lock()
        original = werkzeug.serving.WSGIRequestHandler.log_request

        def counted(handler, *args, **kwargs):
            with lock:
                self.count += 1

        werkzeug.serving.WSGIRequestHandler.log_request = counted
        self._restore = lambda: setattr(werkzeug.serving.WSGIRequestHandler, "log_request", original)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def stop(self):
        self.server.stop()
        self._restore()


def put_records(prefix: str, ids) -> None:
    """Records straight into the server's store: the setup, not measured (100,000 PUTs through
    HTTP take minutes)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    from tests.records import synthetic_record

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for vid in ids:
        backend.put_object(BUCKET, f"{prefix}/records/{vid}.json", json.dumps(synthetic_record(vid)).encode())


def measured(server: CountingServer, step):
    before, t0 = server.count, time.perf_counter()
    out = step()
    return out, time.perf_counter() - t0, server.count - before


def ratio(name: str, seconds: float, requests: int, full: tuple[float, int]) -> str:
    return (f"{name} {seconds:.2f} s, {requests} requests: {seconds / full[0]:.4f}x the time, "
            f"{requests / full[1]:.4f}x the requests of the full rebuild")


def bench_index(args, server: CountingServer) -> None:
    from deltalake import write_deltalake

    from cluster.dataset import DatasetIndex
    from cluster.storage import Storage

    from tests.records import synthetic_record

    prefix, t0 = "data", time.perf_counter()
    ids = [f"v{i:07d}" for i in range(args.records)]
    put_records(prefix, ids)
    index = DatasetIndex(Storage(f"s3://{BUCKET}/{prefix}", server.endpoint))
    per_run = -(-len(ids) // args.runs)
    for start in range(0, len(ids), per_run):  # the tables as the earlier runs left them (rows made here, not read)
        rows = [index.rows(synthetic_record(vid)) for vid in ids[start:start + per_run]]
        for name, (schema, _) in index.TABLES.items():
            write_deltalake(index.uri(name), pa.Table.from_pylist([r[name] for r in rows], schema=schema), mode="append",
                            storage_options=index.options)
            index.compact(name)  # as an update does, once there are many files
    put_records(prefix, (f"late{i:06d}" for i in range(args.new)))
    print(f"setup: {args.records} committed videos indexed by {args.runs} runs, {args.new} more committed by a "
          f"driver that died before its update, in {time.perf_counter() - t0:.0f} s", flush=True)

    def recovery():
        committed = index.committed()
        missing, _ = index.reconcile(committed)
        return len(missing), index.add([index.rows(r) for r in missing])

    (late, _), recovery_s, recovery_requests = measured(server, recovery)
    new = [synthetic_record(f"new{i:06d}") for i in range(args.new)]  # what the next run's replicas return
    put_records(prefix, (r["id"] for r in new))
    versions, update_s, update_requests = measured(server, lambda: index.add([index.rows(r) for r in new]))
    rows, full_s, full_requests = measured(server, index.rebuild)
    assert late == args.new and rows == args.records + 2 * args.new and len(index.committed()) == rows
    full = (full_s, full_requests)
    print(f"index update for {args.new} new videos in a {args.records}-video dataset; the full rebuild from every "
          f"record ({rows}): {full_s:.1f} s, {full_requests} requests")
    print("  " + ratio("the run's update:", update_s, update_requests, full) + " (goal: < 1/20 = 0.05x)")
    print("  " + ratio("recovery after a driver died before it (listing, reads, merge):", recovery_s,
                       recovery_requests, full))


STARTUP = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
from cluster.dataset import DatasetIndex
from cluster.storage import Storage, storage_options
from jobs.manifest import iter_manifest
from jobs.settings import BatchSettings
from jobs.stories import TaskSource

def peak_mb():  # this process's own high-water mark (ru_maxrss would count the parent's, from before exec)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

t0 = time.perf_counter()
storage = Storage({output!r}, {endpoint!r})
index = DatasetIndex(storage)
committed = index.committed()
late, gone = index.reconcile(committed)
loaded = time.perf_counter() - t0
counts = {{"tasks": 0, "skipped": 0, "repeated": 0, "rejected": 0}}
settings = BatchSettings(scripts={manifest!r}, output={output!r}, endpoint_url={endpoint!r})
source = TaskSource(iter_manifest(settings.scripts, storage_options(settings.scripts, {endpoint!r}),
                                  limits=settings.limits(settings.preset)), storage, settings,
                    reject=lambda item, why: counts.__setitem__("rejected", counts["rejected"] + 1),
                    skipped=lambda n, whole: counts.__setitem__("skipped", counts["skipped"] + n),
                    repeated=lambda: counts.__setitem__("repeated", counts["repeated"] + 1), committed=committed)
digest = "5" * 64
while (task := source.next()) is not None:  # rendered: its videos join what is committed
    counts["tasks"] += 1
    source.finished(task, {{"records": [{{"id": v, "script_sha256": digest}} for v in source.in_flight[task.video_id]]}})
print(json.dumps({{"seconds": time.perf_counter() - t0, "load_seconds": loaded, "committed": len(committed),
                   "peak_rss_mb": peak_mb(), **counts}}))
"""


def bench_startup(args, server: CountingServer, client) -> None:
    """The dataset of part 1 holds ids v0000000...: the manifest's first lines are those
    scripts as they were committed; of the lines after them, every tenth repeats the one before."""
    from tests.records import synthetic_record

    lines, committed = args.lines, min(args.records, args.lines // 2)
    t0 = time.perf_counter()
    with open("/tmp/memflow-scale-manifest.jsonl", "w") as f:
        for i in range(lines):
            n = i if i < committed else i - (i % 10 == 0)
            script = synthetic_record(f"v{n:07d}" if n < committed else f"new-line-{n:07d}")["script"]
            f.write(json.dumps(script) + "\n")
    client.upload_file("/tmp/memflow-scale-manifest.jsonl", BUCKET, "manifest.jsonl")
    os.unlink("/tmp/memflow-scale-manifest.jsonl")
    print(f"setup: a {lines}-line manifest in {time.perf_counter() - t0:.0f} s", flush=True)
    code = STARTUP.format(repo=str(REPO), output=f"s3://{BUCKET}/data", endpoint=server.endpoint,
                          manifest=f"s3://{BUCKET}/manifest.jsonl")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["skipped"] == committed and out["rejected"] == 0, out
    print(f"driver start-up on a {lines}-line manifest ({out['committed']} videos committed at the end): "
          f"{out['seconds']:.0f} s (table and listing {out['load_seconds']:.1f} s), peak memory "
          f"{out['peak_rss_mb']:.0f} MB; {out['tasks']} tasks, {out['skipped']} lines committed already, "
          f"{out['repeated']} repeated (goal: < 120 s, < 1024 MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--new", type=int, default=1_000)
    ap.add_argument("--runs", type=int, default=100, help="runs that indexed the --records (a file per run)")
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--no-startup", action="store_true", help="part 1 only")
    args = ap.parse_args()
    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="scale", AWS_SECRET_ACCESS_KEY="scale", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MEMFLOW_S3_ENDPOINT", "AWS_PROFILE"):
        os.environ.pop(name, None)
    server = CountingServer()
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket=BUCKET)
        bench_index(args, server)  # the start-up reads this dataset too
        if not args.no_startup:
            bench_startup(args, server, client)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
