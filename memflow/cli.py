"""`python -m memflow render`: one script to one mp4, with a progress bar over chunks."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import FIDELITIES, MEMORY_MODES, PRESETS, get_preset
from .script import ScriptError, parse_script


def load_script_arg(script: str | None, prompts: list[str] | None, seconds: float, seed: int | None):
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
    return parse_script(data)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render one script to an mp4")
    r.add_argument("--script", help="script as a JSON file or inline JSON ({'segments': [...]} or {'prompts': [...]})")
    r.add_argument("--prompt", action="append", help="inline prompt, one segment each (repeatable)")
    r.add_argument("--seconds", type=float, default=10.0, help="seconds per --prompt segment (default 10)")
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
    r.add_argument("-o", "--output", required=True, help="mp4 path")
    return p


def render(args) -> int:
    from tqdm import tqdm

    from .pipeline import MemFlowGenerator

    script = load_script_arg(args.script, args.prompt, args.seconds, args.seed)
    preset = get_preset(args.preset).with_memory(mode=args.memory, fidelity=args.fidelity)
    t0 = time.perf_counter()
    gen = MemFlowGenerator.from_preset(preset, model=args.model, transformer=args.transformer, lora=args.lora,
                                       device=args.device)
    load_s = time.perf_counter() - t0
    plan = script.plan(preset.memory.frames_per_chunk)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=plan.num_chunks, unit="chunk", desc=script.video_id, file=sys.stderr) as bar:
        result = gen.render(script, out, on_chunk=lambda e: bar.update(1))
    g = result.generation
    total = g.seconds + result.decode_seconds
    print(f"{out}: {result.frames} frames ({result.frames / g.fps:.1f} s of video at {g.fps} fps), "
          f"{len(plan.segments)} segments, {plan.num_chunks} chunks; generated in {g.seconds:.1f} s "
          f"({g.generation_fps:.1f} FPS), decoded+encoded in {result.decode_seconds:.1f} s, "
          f"{result.frames / total:.1f} FPS end to end (load {load_s:.1f} s)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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
