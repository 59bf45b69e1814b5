"""What the memory bank service costs: NAM ranking through Ray actors vs in-process.

Part 1 renders the same script on the `small` preset twice, once with the
in-process ranker and once with the sharded service, timing every ranker call and
counting the bytes that cross the wire (descriptors and frame ids), and prints the
share of chunk time spent on ranking. Part 2 times `rank` alone at the official
wan2.1-1.3b descriptor size (30 blocks x 12 heads x 128). Target: under 1% of chunk time.

    python benchmarks/memory_service.py [--chunks 24] [--shards 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.memory_overhead import RandomText  # noqa: E402
from cluster.memory_service import MemoryServiceClient, start_shards  # noqa: E402
from memflow.config import get_preset  # noqa: E402
from memflow.memory import InProcessRanker  # noqa: E402
from memflow.pipeline import MemFlowGenerator  # noqa: E402
from memflow.script import parse_script  # noqa: E402
from memflow.transformer import build_transformer  # noqa: E402


class Timed:
    """A Ranker proxy that times calls and counts the bytes sent and received."""

    def __init__(self, inner):
        self.inner, self.seconds, self.bytes, self.calls = inner, 0.0, 0, 0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def record(self, video, frame, descriptor, meta=None):
        self.bytes += descriptor.numel() * 4 + 16
        return self._timed(self.inner.record, video, frame, descriptor, meta)

    def rank(self, video, text, candidates, keep):
        kept = self._timed(self.inner.rank, video, text, candidates, keep)
        self.bytes += text.numel() * 4 + 8 * (sum(map(len, candidates)) + sum(map(len, kept)))
        return kept

    def release(self, video):
        return self._timed(self.inner.release, video)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
    shards = start_shards(args.shards, "bench-memory")
    ray.get([s.stats.remote() for s in shards])

    preset = get_preset("small")
    net = build_transformer(preset.transformer)
    gen = MemFlowGenerator(net, RandomText(preset.transformer["text_dim"], preset.text_len), None, preset)
    seconds = args.chunks * 3 / 4 / 2
    script = parse_script({"segments": [{"prompt": "a", "seconds": seconds}, {"prompt": "b", "seconds": seconds}]})
    print(f"part 1: preset small, {args.chunks} chunks, NAM+SMA, {args.shards} shard(s)")
    results = {}
    for name, ranker in (("in-process", Timed(InProcessRanker())), ("service", Timed(MemoryServiceClient(shards))),
                         ("in-process", Timed(InProcessRanker())), ("service", Timed(MemoryServiceClient(shards)))):
        g = gen.generate(script, ranker=ranker, video_id=f"bench-{name}")
        results[name] = (g, ranker)  # the second round (warm) is kept
    (gi, ri), (gs, rs) = results["in-process"], results["service"]
    assert torch.equal(gi.latents, gs.latents), "the service must select exactly the in-process frames"
    print(f"{'ranker':11} {'calls':>6} {'ms/chunk':>9} {'bytes/chunk':>12} {'share of chunk time':>20}")
    for name, g, r in (("in-process", gi, ri), ("service", gs, rs)):
        n = len(g.chunk_seconds)
        print(f"{name:11} {r.calls:6d} {1000 * r.seconds / n:9.3f} {r.bytes / n:12.0f} "
              f"{100 * r.seconds / sum(g.chunk_seconds):19.3f}%")
    print("(identical latents: the service selected exactly the in-process frames)")

    print(f"\npart 2: rank() alone at wan2.1-1.3b size (30 blocks x 12 heads x 128), bank of 3, {args.calls} calls")
    text = torch.randn(30, 12, 128)
    for name, ranker in (("in-process", InProcessRanker()), ("service", MemoryServiceClient(shards))):
        for f in (0, 9, 18):
            ranker.record("v", f, torch.randn(30, 12, 128), {"chunk": f // 3})
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            ranker.rank("v", text, [[0, 9, 18]] * 30, 2)
            times.append(time.perf_counter() - t0)
        ranker.release("v")
        print(f"{name:11} median {1000 * statistics.median(times):.3f} ms, p95 "
              f"{1000 * sorted(times)[int(0.95 * len(times))]:.3f} ms per rank "
              f"(one rank per {preset.memory.record_interval} chunks; an H100 wan2.1-1.3b chunk is ~640 ms at 18.7 FPS)")
    ray.shutdown()


if __name__ == "__main__":
    main()
