"""The dataset index and the driver at scale, on a local S3 server (moto), no rendering.

1. A dataset of --records committed videos (synthetic records, tests/records.py) indexed
   in the Delta tables, then --new more committed: the incremental update (what a run
   does: list records/, find what the table misses, one read per new record, one merge
   per table) beside a full rebuild from every record (what the index cost before it was
   a table: every record read at the end of every run). Time and S3 requests of each,
   counted at the server.
2. The driver's start-up on a --lines manifest (half its lines committed already, a
   tenth repeated): the committed ids read from the table, the records listing, then
   every line parsed, checked for duplicate ids and against what is committed, as the
   task source does before a single replica is needed. Seconds and peak memory (RSS of
   a child process that does only this).

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def put_records(client, prefix: str, ids, threads: int = 32) -> None:
    from tests.records import synthetic_record

    def put(vid):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/records/{vid}.json", Body=json.dumps(synthetic_record(vid)))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, ids))


def measured(server: CountingServer, step):
    before, t0 = server.count, time.perf_counter()
    out = step()
    return out, time.perf_counter() - t0, server.count - before


def bench_index(args, server: CountingServer, client) -> None:
    from cluster.dataset import DatasetIndex
    from cluster.storage import Storage

    from tests.records import synthetic_record

    prefix = "data"
    t0 = time.perf_counter()
    ids = [f"v{i:07d}" for i in range(args.records)]
    put_records(client, prefix, ids)
    index = DatasetIndex(Storage(f"s3://{BUCKET}/{prefix}", server.endpoint))
    for start in range(0, len(ids), 20_000):  # the index as earlier runs left it (rows made here, not read)
        index.add([index.rows(synthetic_record(vid)) for vid in ids[start:start + 20_000]])
    print(f"setup: {args.records} committed videos written and indexed in {time.perf_counter() - t0:.0f} s",
          flush=True)
    put_records(client, prefix, (f"new{i:06d}" for i in range(args.new)))

    def incremental():
        committed = index.committed()
        missing, _ = index.reconcile(committed)
        rows = [index.rows(r) for r in missing]
        return len(rows), index.add(rows)

    (added, versions), inc_s, inc_requests = measured(server, incremental)
    rows, full_s, full_requests = measured(server, index.rebuild)
    assert added == args.new and rows == args.records + args.new
    print(f"index update for {args.new} new videos in a {args.records}-video dataset: incremental {inc_s:.1f} s, "
          f"{inc_requests} requests; full rebuild from every record {full_s:.1f} s, {full_requests} requests: "
          f"{inc_s / full_s:.3f}x the time, {inc_requests / full_requests:.3f}x the requests (goal: < 1/20 = 0.05x)")


STARTUP = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from cluster.dataset import DatasetIndex
from cluster.storage import Storage, storage_options
from jobs.manifest import iter_manifest
from jobs.settings import BatchSettings
from jobs.stories import TaskSource

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
while source.next() is not None:
    counts["tasks"] += 1
print(json.dumps({{"seconds": time.perf_counter() - t0, "load_seconds": loaded, "committed": len(committed),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **counts}}))
"""


def bench_startup(args, server: CountingServer, client) -> None:
    """Half the lines committed (the dataset of part 1 holds ids v0000000...), a tenth repeats."""
    lines, committed = args.lines, min(args.records, args.lines // 2)
    t0 = time.perf_counter()
    with open("/tmp/memflow-scale-manifest.jsonl", "w") as f:
        for i in range(lines):
            n = i if i < committed else i - (i % 10 == 0)  # every tenth new line repeats the one before
            vid = f"v{n:07d}" if n < committed else f"new-line-{n:07d}"
            f.write(json.dumps({"id": vid, "segments": [{"prompt": f"{vid}: scene 0", "seconds": 5.0},
                                                        {"prompt": f"{vid}: scene 1", "seconds": 5.0}]}) + "\n")
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
    print(f"driver start-up on a {lines}-line manifest ({out['committed']} videos committed): {out['seconds']:.0f} s "
          f"(table and listing {out['load_seconds']:.1f} s), peak memory {out['peak_rss_mb']:.0f} MB; "
          f"{out['tasks']} tasks, {out['skipped']} lines committed already, {out['repeated']} repeated "
          f"(goal: < 120 s, < 1024 MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--new", type=int, default=1_000)
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
        bench_index(args, server, client)  # the start-up reads this dataset too
        if not args.no_startup:
            bench_startup(args, server, client)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
