"""`python -m memflow render`: one script to one mp4, with progress bars over the chunks
generated and the frames decoded and encoded."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .attention import CHOICES as ATTENTION_CHOICES
from .config import FIDELITIES, MEMORY_MODES, PRESETS, get_preset
from .script import Limits, ScriptError, parse_script

EXAMPLES = """examples:
  python -m memflow render --script fox.json -o fox.mp4
  python -m memflow render --prompt "a fox trots across a snowy meadow" --prompt "the fox curls up and sleeps" \\
      --seconds 5 -o fox.mp4        # two segments of 5 s: a 10 s video, the prompt switching at 5 s

Each --prompt is one segment, in order; --seconds is the length of each of them (not of
the whole video). For segments of different lengths, give a script:
  --script '{"segments": [{"prompt": "...", "seconds": 4}, {"prompt": "...", "seconds": 8}]}'
"""


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (v2) CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def limit_threads(threads: int | None) -> int:
    """Cap torch's CPU threads (default: the usable CPUs, at most 8) before torch starts.

    Torch would take every core of the machine, container quota or not, and its OpenMP
    threads spin while they wait: next to other work (or to the encoder's own threads)
    that made generation 5.6x and decoding+encoding 3x slower on a busy 2-core machine than with the
    waiting threads asleep (OMP_WAIT_POLICY=PASSIVE, set here unless given)."""
    threads = threads or min(usable_cpus(), 8)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP
    import torch

    torch.set_num_threads(threads)
    return threads


def _counted(frames, bar):
    for frame in frames:
        yield frame
        bar.update(1)


def load_script_arg(script: str | None, prompts: list[str] | None, seconds: float, seed: int | None,
                    limits: Limits | None = None):
    """A script from a JSON file, inline JSON, or --prompt flags (one segment each)."""
    if script and prompts:
        raise ScriptError("give either --script or --prompt, not both")
    if prompts:
        data = {"segments": [{"prompt": p, "seconds": seconds} for p in prompts]}
    elif script:
        path = Path(script)
        text = path.read_text() if path.is_file() else script
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            where = f"file {path}" if path.is_file() else "--script (neither a file nor JSON)"
            raise ScriptError(f"{where}: not valid JSON: {e}") from None
    else:
        raise ScriptError("nothing to render: give --script FILE|JSON or --prompt TEXT (repeatable)")
    if seed is not None and isinstance(data, dict):
        data["seed"] = seed
    return parse_script(data, limits)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render one script to an mp4", description="Render one script to an mp4.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--script", help="script as a JSON file or inline JSON ({'segments': [...]} or {'prompts': [...]})")
    r.add_argument("--prompt", action="append",
                   help="a segment's prompt; repeat it for several segments, played in order")
    r.add_argument("--seconds", type=float, default=10.0,
                   help="length of EACH --prompt segment, in seconds (default 10): 3 prompts with --seconds 5 "
                        "make a 15 s video")
    r.add_argument("--seed", type=int, help="override the script's seed")
    r.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    r.add_argument("--model", help="weights: diffusers Wan folder/URL, optionally with MemFlow base.pt + lora.pt")
    r.add_argument("--transformer", help="transformer weights overriding --model (folder, .safetensors, .pt, base.pt)")
    r.add_argument("--lora", help="MemFlow lora.pt to merge at load")
    r.add_argument("--memory", default="nam", choices=MEMORY_MODES,
                   help="memory: off (memory-free baseline), nam (the bank; default, what the checkpoint was "
                        "trained with), nam+sma (also Sparse Memory Activation: faster)")
    r.add_argument("--fidelity", default="reference", choices=FIDELITIES,
                   help="memory policy: reference (default: exactly what the released MemFlow checkpoint runs "
                        "with) or paper (the paper's clean semantics); see the README")
    r.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    r.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the transformer blocks (auto: on a GPU)")
    r.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="attention kernel (auto: cuDNN, then FlashAttention/FA3, then memory-efficient)")
    r.add_argument("--threads", type=int, help="torch CPU threads (default: the CPUs this process may use, at most 8)")
    r.add_argument("--max-seconds", type=float, help="longest video accepted, in seconds (default 600)")
    r.add_argument("-o", "--output", required=True, help="mp4 path")
    return p


def render(args) -> int:
    preset = get_preset(args.preset).with_memory(mode=args.memory, fidelity=args.fidelity)
    script = load_script_arg(args.script, args.prompt, args.seconds, args.seed,
                             Limits.for_preset(preset, max_seconds=args.max_seconds))
    threads = limit_threads(args.threads)
    from tqdm import tqdm

    from .pipeline import MemFlowGenerator
    from .video import write_mp4

    t0 = time.perf_counter()
    gen = MemFlowGenerator.from_preset(preset, model=args.model, transformer=args.transformer, lora=args.lora,
                                       device=args.device, compile={"auto": None, "on": True, "off": False}[args.compile],
                                       attention=args.attention)
    load_s = time.perf_counter() - t0
    plan = script.plan(preset.memory.frames_per_chunk)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # two bars: the chunks generated, and the frames decoded and encoded alongside them
    with tqdm(total=plan.num_chunks, unit="chunk", desc=f"generate {script.video_id}", file=sys.stderr,
              position=0) as chunks, \
            tqdm(total=plan.num_video_frames, unit="frame", desc="decode+encode", file=sys.stderr, position=1) as bar:
        g = gen.generate(script, on_chunk=lambda e: chunks.update(1),
                         frames_to=lambda frames: write_mp4(_counted(frames, bar), out, fps=script.fps))
    frames, decode_s = g.decoded, g.decode_tail_seconds
    total = time.perf_counter() - t0 - load_s
    print(f"{out}: {frames} frames ({frames / g.fps:.1f} s of video at {g.fps} fps), "
          f"{len(plan.segments)} segments, {plan.num_chunks} chunks; generated in {g.seconds:.1f} s "
          f"({g.generation_fps:.1f} FPS), decoding+encoding alongside, {decode_s:.1f} s after the last chunk; "
          f"{frames / total:.1f} FPS end to end (load {load_s:.1f} s, {threads} torch threads, "
          f"{'compiled' if gen.transformer.compiled else 'eager'}, memory {args.memory}, {args.fidelity} policy)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None and args.threads < 1:
        _parser().error("--threads must be at least 1")
    try:
        return render(args)
    except ScriptError as e:
        print(f"error: bad script: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
