"""Scripts per hour of one generator replica, pipelined vs serial, side by side.

Pipelined (the default): the replica runs two renders at once; one script generates
while the one before it finishes decoding, encoding, uploading and committing, and each
script is decoded alongside its own generation. Serial: the next script starts only
when the last one has committed. Both replicas live for the whole run and take turns,
round by round (same scripts, same machine state), on a private local Ray on 127.0.0.1;
the spread over rounds is printed with each median.

    python benchmarks/replica.py                        # tiny preset, CPU
    python benchmarks/replica.py --preset small --scripts 6 --rounds 3
    python benchmarks/replica.py --preset wan2.1-1.3b --device cuda --seconds 60 --scripts 4 --output s3://...
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from cluster.replica import GeneratorReplica  # noqa: E402
from cluster.settings import ReplicaSettings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scripts", type=int, default=6, help="scripts per round")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of video per script")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output", help="output prefix (default: a temporary folder)")
    args = ap.parse_args()

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    output = args.output or tempfile.mkdtemp(prefix="memflow-replica-bench-")
    gpu = {"num_gpus": 1} if args.device == "cuda" else {"num_gpus": 0}
    replicas = {mode: GeneratorReplica.options(num_cpus=1, **gpu).remote(
        ReplicaSettings(output=os.path.join(output, mode), preset=args.preset, device=args.device,
                      pipelined=mode == "pipelined"), None, 0) for mode in ("pipelined", "serial")}
    ray.get([r.status.remote() for r in replicas.values()])  # both loaded
    half = args.seconds / 2
    per_hour = {mode: [] for mode in replicas}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        order = list(replicas) if rnd % 2 else list(replicas)[::-1]
        for mode in order:
            scripts = [{"id": f"{mode}-{rnd}-{i}-{uuid.uuid4().hex[:6]}", "seed": i,
                        "segments": [{"prompt": f"a lighthouse, take {i}", "seconds": half},
                                     {"prompt": "a storm over the sea", "seconds": half}]}
                       for i in range(args.scripts)]
            t0 = time.perf_counter()
            # two in flight, as the batch scheduler keeps them; the serial replica runs them one by one
            ray.get([replicas[mode].render.remote({"script": s}, s["id"], 1) for s in scripts])
            wall = time.perf_counter() - t0
            if rnd:
                per_hour[mode].append(args.scripts / wall * 3600)
                print(f"round {rnd} {mode:9}: {args.scripts} scripts in {wall:6.1f} s", flush=True)
    print(f"\n{args.scripts} scripts of {args.seconds:g} s per round, preset {args.preset}, {args.device}, "
          f"{args.rounds} rounds (median [min-max])")
    for mode, values in per_hour.items():
        print(f"{mode:9}: {statistics.median(values):8.1f} scripts/hour [{min(values):.1f}-{max(values):.1f}]")
    ratios = [p / s for p, s in zip(per_hour["pipelined"], per_hour["serial"])]
    print(f"pipelined vs serial: {statistics.median(ratios):.2f}x (per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    ray.shutdown()


if __name__ == "__main__":
    main()
