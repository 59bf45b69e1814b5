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

from typing import Optional

from pydantic import Field

from .script import Limits, ScriptError, parse_script
from .settings import EncodeSettings, EngineSettings, LimitSettings, QualitySettings, SettingsError, add_flags

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


class RenderSettings(EngineSettings, QualitySettings, EncodeSettings, LimitSettings):
    """`python -m memflow render`: one script (or a tree of them) to mp4."""

    script: Optional[str] = Field(None, description="script as a JSON file or inline JSON ({'segments': [...]} or "
                                                    "{'prompts': [...]})")
    prompt: Optional[list[str]] = Field(None, description="a segment's prompt; repeat it for several segments, "
                                                          "played in order")
    seconds: float = Field(10.0, gt=0, description="length of EACH --prompt segment, in seconds: 3 prompts with "
                                                   "--seconds 5 make a 15 s video")
    seed: Optional[int] = Field(None, ge=0, description="override the script's seed")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (default: the CPUs this process may "
                                                           "use, at most 8)")
    output: str = Field(..., description="mp4 path; for a branching script, a folder (one <id>.mp4 per node)",
                        json_schema_extra={"short": "-o", "metavar": "PATH"})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render one script to an mp4", description="Render one script to an mp4.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                       argument_default=argparse.SUPPRESS)
    add_flags(r, RenderSettings)
    return p


def parse(argv=None) -> RenderSettings:
    given = vars(_parser().parse_args(argv))
    del given["command"]
    return RenderSettings.from_flags(given).settings


def render(args: RenderSettings) -> int:
    script = load_script_arg(args.script, args.prompt, args.seconds, args.seed, args.limits(args.preset))
    if script.continues is not None:
        raise ScriptError("continues: a continuation names a video a batch job committed; render it with "
                          "jobs/batch.py (or in Python: MemFlowGenerator.generate(script, prefix=its latents))")
    threads = limit_threads(args.threads)
    if script.is_tree:
        return render_tree_to(args, script, threads)
    from tqdm import tqdm

    from .pipeline import MemFlowGenerator
    from .video import write_mp4

    t0 = time.perf_counter()
    gen = MemFlowGenerator.from_settings(args)
    load_s = time.perf_counter() - t0
    plan = script.plan(gen.memory.frames_per_chunk)
    meter = quality_meter(args, plan, script.fps, gen.device)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # two bars: the chunks generated, and the frames decoded and encoded alongside them
    with tqdm(total=plan.num_chunks, unit="chunk", desc=f"generate {script.video_id}", file=sys.stderr,
              position=0) as chunks, \
            tqdm(total=plan.num_video_frames, unit="frame", desc="decode+encode", file=sys.stderr, position=1) as bar:
        g = gen.generate(script, on_chunk=lambda e: chunks.update(1),
                         frames_to=lambda frames: write_mp4(_counted(meter.observe(frames), bar), out,
                                                            fps=script.fps, crf=args.crf))
    frames, decode_s = g.decoded, g.decode_tail_seconds
    total = time.perf_counter() - t0 - load_s
    print(f"{out}: {frames} frames ({frames / g.fps:.1f} s of video at {g.fps} fps), "
          f"{len(plan.segments)} segments, {plan.num_chunks} chunks; generated in {g.seconds:.1f} s "
          f"({g.generation_fps:.1f} FPS), decoding+encoding alongside, {decode_s:.1f} s after the last chunk; "
          f"{frames / total:.1f} FPS end to end (load {load_s:.1f} s, {threads} torch threads, "
          f"{'compiled' if gen.transformer.compiled else 'eager'}, memory {args.memory}, {args.fidelity} policy)")
    video = meter.result()["video"]
    print("quality: " + ", ".join(f"{k} {v:.4g}" for k, v in video.items() if v is not None))
    return 0


def render_tree_to(args: RenderSettings, script, threads: int) -> int:
    """A branching script: one mp4 per node into the --output folder, shared chunks generated once."""
    from tqdm import tqdm

    from .pipeline import MemFlowGenerator
    from .tree import render_tree

    gen = MemFlowGenerator.from_settings(args)
    out = Path(args.output)
    if out.suffix == ".mp4":
        raise ScriptError(f"branches: the script has several videos; give --output a folder, not {out.name}")
    with tqdm(unit="chunk", desc=f"generate {script.video_id} (tree)", file=sys.stderr) as bar:
        def progress(event, *_):
            bar.total = event.num_chunks
            bar.update(1)
        t0 = time.perf_counter()
        videos = render_tree(gen, script, out, crf=args.crf, on_chunk=progress)
    contained = sum(g.plan.num_chunks for g in videos.values())
    for vid, g in videos.items():
        s = g.story
        print(f"{out / (vid + '.mp4')}: {g.decoded} frames, {g.plan.num_chunks} chunks ({s['shared']} shared, "
              f"{s['generated']} its own)")
    print(f"{len(videos)} videos, {contained} chunks in them, {bar.n} computed in {time.perf_counter() - t0:.1f} s "
          f"({threads} torch threads, memory {args.memory}, {args.fidelity} policy)")
    return 0


def quality_meter(args: RenderSettings, plan, fps: int, device):
    """The video's quality metrics (memflow/quality), with the backbones the settings name."""
    from .quality import QualityMeter, load_clip, load_dino

    return QualityMeter([(s.video_start, s.video_end, s.prompt) for s in plan.segments], fps,
                        clip=load_clip(args.clip_model, device) if args.clip_model else None,
                        dino=load_dino(args.dino_model, device) if args.dino_model else None)


def main(argv=None) -> int:
    try:
        return render(parse(argv))
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ScriptError as e:
        print(f"error: bad script: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
