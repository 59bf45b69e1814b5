"""How much the batch driver costs: replicas that only sleep, a manifest of 10,000 scripts.

Runs the real driver (`jobs.batch.run`: manifest streaming, validation, resume
checks, bounded in-flight scheduling, progress, compaction) with stand-in replicas
whose `render` sleeps a fixed time, and reports driver overhead per script,
replica utilisation (busy time / (replicas x span)) and the driver's peak memory.
Each manifest size runs in a fresh process so peaks are comparable: the driver's
memory must not grow with the manifest. Targets: utilisation >= 95%, flat memory.

    python benchmarks/scheduler.py [--scripts 10000] [--replicas 16] [--sleep 0.05]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@ray.remote(num_cpus=0)
class SleepReplica:
    """Stands in for a generator replica: a render that only takes time."""

    def __init__(self, seconds: float):
        self.seconds, self.busy, self.first, self.last = seconds, 0.0, None, None

    def render(self, job: dict, video_id: str, attempt: int) -> dict:
        t0 = time.time()
        self.first = self.first or t0
        time.sleep(self.seconds)  # the stand-in for a minute-long render
        self.last = time.time()
        self.busy += self.last - t0
        return {"records": [{"id": video_id, "num_frames": 1, "num_chunks": 1}],
                "chunks": {"generated": 1, "replayed": 0}}

    def stats(self) -> tuple:
        return self.busy, self.first, self.last

    def status(self) -> dict:  # the pool's readiness probe and the stall watchdog's poll
        return {"busy": self.busy}


def child(n: int, replicas: int, sleep: float) -> dict:
    from jobs import batch

    tmp = Path(tempfile.mkdtemp(prefix="sched-bench-"))
    manifest = tmp / "scripts.jsonl"
    with manifest.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"s{i}", "segments": [{"prompt": f"scene {i}", "seconds": 1}]}) + "\n")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
    actors = [SleepReplica.remote(sleep) for _ in range(replicas)]
    ray.get([a.stats.remote() for a in actors])
    args = batch.parse_args(["--scripts", str(manifest), "--output", str(tmp / "out"), "--memory", "off",
                             "--replicas", str(replicas)])
    tracemalloc.start()
    t0 = time.perf_counter()
    status = batch.run(args, replicas=actors)
    wall = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1]
    stats = ray.get([a.stats.remote() for a in actors])
    busy = sum(s[0] for s in stats)
    span = max(s[2] for s in stats) - min(s[1] for s in stats)
    ray.shutdown()
    return {"scripts": n, "status": status, "wall": wall, "utilisation": busy / (replicas * span),
            "overhead_ms": 1000 * (wall - n * sleep / replicas) / n, "py_peak_mb": py_peak / 2**20,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", type=int, default=10000)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--sleep", type=float, default=0.05, help="seconds per stand-in render")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.replicas, args.sleep)))
        return
    print(f"{args.replicas} sleeping replicas, {args.sleep} s per script, 2 in flight per replica")
    print(f"{'scripts':>8} {'wall s':>8} {'utilisation':>12} {'overhead/script':>16} {'py peak':>9} {'RSS peak':>9}")
    for n in (args.scripts // 10, args.scripts):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--replicas", str(args.replicas),
                              "--sleep", str(args.sleep)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['scripts']:8d} {r['wall']:8.1f} {100 * r['utilisation']:11.1f}% {r['overhead_ms']:13.2f} ms "
              f"{r['py_peak_mb']:7.1f}MB {r['rss_peak_mb']:7.0f}MB")
    print("(overhead/script = (wall - scripts x sleep / replicas) / scripts, includes start-up and compaction; "
          "py peak = Python allocations in the driver during the run)")


if __name__ == "__main__":
    main()
