"""What story state saves, measured side by side in one run (memflow/story.py, memflow/tree.py).

1. A tree (a --trunk s trunk, --branches branches of --branch s) rendered as one story vs
   its flattened scripts rendered one by one, each to mp4 (generate, decode, encode):
   chunks computed and time. The two alternate, --rounds times, order swapped each round.
2. A continuation of a --prefix s video: the prefix's state rebuilt by replay from its
   latents vs generated again, stepped in lockstep chunk by chunk (one chunk generated,
   then the same chunk replayed from its latents, each timed on its own). Decoding the
   prefix's frames costs the same either way and is left out.
3. A --long s script whose replica (a real Ray actor) is killed at 80 %, checkpointing
   every --checkpoint-seconds of generation: chunks generated again after the kill vs
   the chunks one checkpoint interval holds.

Times are thread CPU time with torch pinned to --threads (1: the thread does the work)
for 2; for 1 and 3 process CPU time (decoding runs in a thread of its own) and wall.

    python benchmarks/stories.py                       # CPU, preset small: the issue's sizes
    python benchmarks/stories.py --preset tiny --trunk 10 --branch 4 --prefix 10 --long 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from memflow.pipeline import MemFlowGenerator  # noqa: E402
from memflow.script import parse_script  # noqa: E402
from memflow.tree import render_tree  # noqa: E402


def tree_script(trunk: float, branches: int, branch: float) -> dict:
    return {"id": "trunk", "seed": 1, "segments": [{"prompt": f"a lighthouse, part {i}", "seconds": trunk / 3}
                                                   for i in range(3)],
            "branches": [{"id": f"ending-{b}", "segments": [{"prompt": f"ending {b}: the storm", "seconds": branch}]}
                         for b in range(branches)]}


def clocks():
    return time.perf_counter(), time.process_time()


def since(t):
    wall, cpu = clocks()
    return wall - t[0], cpu - t[1]


def bench_tree(gen, args, folder: Path) -> None:
    script = parse_script(tree_script(args.trunk, args.branches, args.branch))
    flats = [n.script for n in script.nodes()]
    rows = {"tree": [], "flat": []}
    for rnd in range(args.rounds):
        for mode in (("tree", "flat") if rnd % 2 == 0 else ("flat", "tree")):
            t = clocks()
            if mode == "tree":
                videos = render_tree(gen, script, folder / f"tree-{rnd}")
                chunks = len({k for v in videos.values() for k in gen.chunk_keys(v.script)})
            else:
                for s in flats:
                    gen.render(s, folder / f"flat-{rnd}-{s.video_id}.mp4")
                chunks = sum(s.plan().num_chunks for s in flats)
            wall, cpu = since(t)
            rows[mode].append((chunks, wall, cpu))
            print(f"  round {rnd} {mode:4}: {chunks:4d} chunks, wall {wall:7.1f} s, CPU {cpu:7.1f} s", flush=True)
    tree, flat = rows["tree"], rows["flat"]
    walls = [t[1] / f[1] for t, f in zip(tree, flat)]
    cpus = [t[2] / f[2] for t, f in zip(tree, flat)]
    print(f"tree of a {args.trunk:g} s trunk + {args.branches} x {args.branch:g} s vs its {len(flats)} flattened "
          f"scripts one by one: chunks {tree[0][0]} vs {flat[0][0]} ({tree[0][0] / flat[0][0]:.2f}x); wall "
          f"{statistics.median(walls):.2f}x [{min(walls):.2f}-{max(walls):.2f}], CPU {statistics.median(cpus):.2f}x "
          f"[{min(cpus):.2f}-{max(cpus):.2f}] (goal: wall <= 0.5x)")


def bench_replay(gen, args) -> None:
    script = parse_script({"id": "p", "seed": 2, "segments": [{"prompt": f"chapter {i}", "seconds": args.prefix / 4}
                                                               for i in range(4)]})
    generating, replaying = gen.story(script), gen.story(script)
    step_s, replay_s = [], []
    while not generating.done:
        t0 = time.thread_time()
        _, x0 = generating.step()
        step_s.append(time.thread_time() - t0)
        t0 = time.thread_time()
        replaying.replay(x0)
        replay_s.append(time.thread_time() - t0)
    assert torch.equal(generating.memory.cache.k, replaying.memory.cache.k), "replay rebuilt another state"
    ratios = [r / s for r, s in zip(replay_s, step_s)]
    q = statistics.quantiles(ratios, n=10)
    print(f"continuation of a {args.prefix:g} s video ({len(step_s)} chunks): prefix generated in {sum(step_s):.1f} s, "
          f"replayed in {sum(replay_s):.1f} s: {sum(replay_s) / sum(step_s):.2f}x (per chunk median "
          f"{statistics.median(ratios):.2f}x, 10-90% {q[0]:.2f}-{q[-1]:.2f}x; goal <= 0.3x)")


def bench_kill(args, folder: Path) -> None:
    import ray

    from cluster.replica import GeneratorReplica
    from cluster.settings import ReplicaSettings

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        config = ReplicaSettings(output=str(folder / "kill"), preset=args.preset, device="cpu",
                                 checkpoint_seconds=args.checkpoint_seconds)
        script = {"id": "long", "seed": 3, "segments": [{"prompt": f"scene {i}", "seconds": args.long / 6}
                                                        for i in range(6)]}
        chunks = parse_script(script).plan().num_chunks
        replica = GeneratorReplica.options(num_cpus=1).remote(config, None, 0)
        ray.get(replica.status.remote())
        ref = replica.render.remote({"script": script}, "long", 1)
        t0, killed_at = time.perf_counter(), None
        while killed_at is None:
            status = ray.get(replica.status.remote())
            if status["video"] == "long" and status["chunk"] >= 0.8 * chunks:
                killed_at = status["chunk"]
                ray.kill(replica, no_restart=False)
            time.sleep(0.05)
        generating_s = time.perf_counter() - t0
        try:
            ray.get(ref)
        except ray.exceptions.RayError:  # killed mid-render, as planned
            pass
        ray.get(replica.status.options(max_task_retries=-1).remote())  # Ray has restarted it
        result = ray.get(replica.render.remote({"script": script}, "long", 2), timeout=3600)
        story = result["records"][0]["story"]
        per_interval = args.checkpoint_seconds / (generating_s / killed_at)
        again = killed_at - story["chunks"]["replayed"]
        print(f"a {args.long:g} s script ({chunks} chunks) killed at chunk {killed_at} (80 %): the retry replayed "
              f"{story['chunks']['replayed']}, generated {story['chunks']['generated']}, so {again} chunks were "
              f"generated again; one {args.checkpoint_seconds:g} s checkpoint interval holds ~{per_interval:.0f} chunks "
              f"here (goal: at most one interval's worth); prefix {story['prefix']!r}")
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trunk", type=float, default=30.0)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--branch", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix", type=float, default=40.0)
    ap.add_argument("--long", type=float, default=60.0)
    ap.add_argument("--checkpoint-seconds", type=float, default=20.0)
    ap.add_argument("--only", choices=["tree", "replay", "kill"], help="run one of the three")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    gen = MemFlowGenerator.from_preset(args.preset, device="cpu")
    print(f"preset {args.preset}, CPU, {args.threads} torch thread(s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="memflow-stories-") as tmp:
        if args.only in (None, "tree"):
            bench_tree(gen, args, Path(tmp))
        if args.only in (None, "replay"):
            bench_replay(gen, args)
        if args.only in (None, "kill"):
            bench_kill(args, Path(tmp))


if __name__ == "__main__":
    main()
