"""What the memory costs, and what a chunk costs end to end: memory-free (LongLive) vs NAM
vs NAM+SMA, eager vs compiled, VAE decode in float32 vs bfloat16.

Every variant steps in lockstep, chunk by chunk (one chunk of each, then the next, the
order rotating), so a noisy machine slows them alike, and each chunk is timed on its
own: thread CPU time on the CPU (torch pinned to --threads, 1 by default, so that the
thread does all the work), CUDA events on a GPU. Only steady-state chunks count (the
bank full, the sink out of the window); each median comes with its spread (10th-90th
percentile). Weights are random: speed does not depend on them.

End to end: the chunks of the memory-free run are also decoded by the VAE and encoded
to H.264 as they come, timed the same way. "serial" FPS adds generation, decoding and
encoding; "overlapped" takes the slower of generation and decode+encode, which is what
a replica that decodes in a second thread (memflow/chunkpipe.py) approaches.

    python benchmarks/memory_overhead.py                          # CPU, preset small
    python benchmarks/memory_overhead.py --compiled               # + torch.compile'd variants
    python benchmarks/memory_overhead.py --preset wan2.1-1.3b --device cuda --compiled --chunks 40

Paper (H100, wan2.1-1.3b): NAM+SMA 18.7 FPS, 7.9% slower than memory-free.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from memflow.config import MEMORY_MODES, get_preset
from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.transformer import Compiled, Eager, build_transformer
from memflow.vae import WanVAE
from memflow.video import Mp4Writer


class RandomText:
    def __init__(self, dim: int, text_len: int):
        self.dim, self.text_len = dim, text_len

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(1, self.text_len, self.dim, generator=g)


class Timer:
    """Times one step: CUDA events on a GPU (waits for them: this is a benchmark), thread CPU time otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, step):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1000
        t0 = time.thread_time()
        out = step()
        return out, time.thread_time() - t0


def spread(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(values, [10, 50, 90])
    return float(q[1]), float(q[0]), float(q[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunks", type=int, default=24, help="chunks per video (steady state from chunk 10)")
    ap.add_argument("--fidelity", default="reference", choices=["reference", "paper"])
    ap.add_argument("--compiled", action="store_true", help="also run every mode torch.compile'd")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    base = get_preset(args.preset)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = build_transformer(base.transformer, seed=0, device=device, dtype=dtype)
    text = RandomText(base.transformer["text_dim"], base.text_len)
    cfg = base.memory
    fpc = cfg.frames_per_chunk
    steady_from = max(cfg.local_attn_size // fpc, cfg.record_interval * cfg.bank_size + 1)
    half = args.chunks // 2 * fpc * 4 / base.fps  # two segments: one prompt switch mid-video
    script = parse_script({"segments": [{"prompt": "a lighthouse", "seconds": half},
                                        {"prompt": "a storm", "seconds": args.chunks * fpc * 4 / base.fps - half}]})
    executions = {"eager": Eager()}
    if args.compiled:
        executions["compiled"] = Compiled()
    variants = {}
    for ex_name, execution in executions.items():
        for mode in MEMORY_MODES:
            gen = MemFlowGenerator(net, text, None, base.with_memory(mode=mode, fidelity=args.fidelity), device=args.device)
            variants[f"{mode} {ex_name}"] = (gen, execution)
    vaes = {"fp32": WanVAE.from_config(base.vae).to(device, torch.float32)}
    if device.type == "cuda":
        vaes["bf16"] = WanVAE.from_config(base.vae).to(device, torch.bfloat16)

    print(f"preset {base.name}: {len(net.blocks)} blocks, {net.heads}x{net.head_dim} heads, "
          f"{base.height}x{base.width} ({base.tokens_per_frame} tokens/latent frame), {device}, {dtype}, "
          f"{args.fidelity} policy, torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    for gen, execution in variants.values():  # warm-up: allocator, kernels, compilation
        net.execution = execution
        gen.generate(script)
    print(f"warm-up (compilation included): {time.perf_counter() - t0:.0f} s")

    timer = Timer(device)
    seconds = {name: [] for name in [*variants, *(f"decode {d}" for d in vaes), "encode"]}
    memories = {name: gen.memory_for(script) for name, (gen, _) in variants.items()}
    streams = {name: gen.chunks(script, memories[name]) for name, (gen, _) in variants.items()}
    decoders = {d: vae.decoder() for d, vae in vaes.items()}
    writer = Mp4Writer(io.BytesIO(), fps=base.fps)
    psnr = []
    order = list(variants)
    for c in range(script.plan().num_chunks):
        order = order[1:] + order[:1]
        chunk = None
        for name in order:
            net.execution = variants[name][1]
            (event, x0), dt = timer(lambda: next(streams[name]))
            if c >= steady_from:
                seconds[name].append(dt)
            if name == "off eager":
                chunk = x0
        frames = {}
        for d, decoder in decoders.items():
            frames[d], dt = timer(lambda: decoder.decode(chunk))
            if c >= steady_from:
                seconds[f"decode {d}"].append(dt)
        _, dt = timer(lambda: [writer.write(f) for f in frames["fp32"]])
        if c >= steady_from:
            seconds["encode"].append(dt)
        if "bf16" in frames:
            a, b = (np.stack(frames[d]).astype(np.float64) for d in ("fp32", "bf16"))
            psnr.append(10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)))
    writer.close()
    steady = len(seconds["encode"])

    video_frames = 4 * fpc
    print(f"\nper steady-state chunk ({steady} chunks of each, lockstep; median [p10-p90]), "
          f"{video_frames} video frames per chunk")
    ref = statistics.median(seconds["off eager"])
    decode = statistics.median(seconds["decode fp32" if device.type == "cpu" else "decode bf16"])
    encode = statistics.median(seconds["encode"])
    print(f"{'variant':18} {'s/chunk':>22} {'FPS':>7} {'vs off':>8} {'e2e serial':>11} {'e2e overlap':>12}")
    for name in variants:
        med, lo, hi = spread(seconds[name])
        base_name = "off " + name.split()[-1]
        vs_off = 100 * (med / statistics.median(seconds[base_name]) - 1)
        print(f"{name:18} {med:8.4f} [{lo:.4f}-{hi:.4f}] {video_frames / med:7.2f} {vs_off:+7.1f}% "
              f"{video_frames / (med + decode + encode):11.2f} {video_frames / max(med, decode + encode):12.2f}")
    for name in [n for n in seconds if n not in variants]:
        med, lo, hi = spread(seconds[name])
        print(f"{name:18} {med:8.4f} [{lo:.4f}-{hi:.4f}] {1000 * med:7.1f} ms/chunk")
    if args.compiled:
        for mode in MEMORY_MODES:
            ratio = statistics.median(seconds[f"{mode} eager"]) / statistics.median(seconds[f"{mode} compiled"])
            print(f"compiled vs eager, {mode}: {ratio:.2f}x faster")
    if psnr:
        print(f"bf16 vs fp32 decode: PSNR min {min(psnr):.1f} dB, median {statistics.median(psnr):.1f} dB")
    for name in variants:
        if name.endswith("eager"):
            print(f"KV held, {name.split()[0]}: {memories[name].nbytes() / 2**20:.1f} MB (preallocated)")
    if device.type == "cuda":
        print(f"GPU peak (all variants together): {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB")
    print(f"(off: memory-free; e2e FPS = {video_frames} video frames / (generate + decode + encode) per chunk; "
          f"decode {'fp32 on CPU' if device.type == 'cpu' else 'bf16'})")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
