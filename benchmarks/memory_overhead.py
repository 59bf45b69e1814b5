"""What the memory costs: chunk throughput of memory-free (LongLive) vs NAM vs NAM+SMA.

The three modes run side by side in one process, interleaved round by round so a
noisy machine slows them alike; steady-state chunks only (after the sink has left
the window and the bank is full). Weights are random: speed does not depend on them.
The text encoder is replaced by random embeddings (encoded once per segment, it is
not part of the per-chunk cost).

    python benchmarks/memory_overhead.py                         # CPU, preset small
    python benchmarks/memory_overhead.py --preset wan2.1-1.3b --device cuda --chunks 40

Paper (H100, wan2.1-1.3b): NAM+SMA 18.7 FPS, 7.9% slower than memory-free. Our target: <= 5%.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from memflow.config import MEMORY_MODES, get_preset
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import build_transformer


class RandomText:
    def __init__(self, dim: int, text_len: int):
        self.dim, self.text_len = dim, text_len

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(1, self.text_len, self.dim, generator=g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunks", type=int, default=16, help="chunks per video")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    base = get_preset(args.preset)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = build_transformer(base.transformer, seed=0, device=device, dtype=dtype)
    text = RandomText(base.transformer["text_dim"], base.text_len)
    fpc = base.memory.frames_per_chunk
    seconds = args.chunks * fpc * 4 / 16 / 2  # two segments: one prompt switch
    script = parse_script({"segments": [{"prompt": "a", "seconds": seconds}, {"prompt": "b", "seconds": seconds}]})
    steady_from = (base.memory.sink_size + base.memory.local_attn_size) // fpc + base.memory.record_interval * 2
    gens = {m: MemFlowGenerator(net, text, None, base.with_memory(mode=m), device=args.device) for m in MEMORY_MODES}

    print(f"preset {base.name}: {len(net.blocks)} blocks, {net.heads}x{net.head_dim} heads, "
          f"{base.height}x{base.width} ({base.tokens_per_frame} tokens/latent frame), device {device}, {dtype}")
    gens["off"].generate(script)  # warm-up (allocator, kernels)
    chunk_times = {m: [] for m in MEMORY_MODES}
    peaks = {}
    for _ in range(args.rounds):
        for mode, gen in gens.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            g = gen.generate(script)
            chunk_times[mode] += g.chunk_seconds[steady_from:]
            peaks[mode] = (g.peak_memory_bytes,
                           torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    frames_per_chunk_video = 4 * fpc
    ref = statistics.median(chunk_times["off"])
    print(f"{'mode':8} {'s/chunk':>9} {'FPS':>7} {'vs off':>8} {'KV held':>10} {'GPU peak':>10}")
    for mode in MEMORY_MODES:
        med = statistics.median(chunk_times[mode])
        kv, gpu = peaks[mode]
        print(f"{mode:8} {med:9.4f} {frames_per_chunk_video / med:7.2f} {100 * (med / ref - 1):+7.1f}% "
              f"{kv / 2**20:8.1f}MB {'' if gpu is None else f'{gpu / 2**30:8.2f}GB'}")
    print(f"(median over {len(chunk_times['off'])} steady-state chunks per mode, {args.rounds} interleaved rounds; "
          f"FPS = {frames_per_chunk_video} video frames per chunk / seconds per chunk, decode excluded)")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
