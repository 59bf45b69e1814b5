"""What the quality metrics cost per video, next to what generating and decoding it costs.

One two-segment script is generated once; then its frames are decoded round after
round with no meter, with the model-free meter (flicker) and with CLIP + DINO, the
three interleaved so a noisy machine slows them alike. The metric cost is the
meter's own time (QualityMeter.seconds); decoding is timed without it.

Backbones: --clip-model / --dino-model folders (a real CLIP ViT-B/32 and DINO
ViT-B/16, say), else random models of exactly those architectures at 224 px built
from transformers configs (cost does not depend on the weights). Text encoding is
random embeddings and the VAE random, as in memory_overhead.py.

    python benchmarks/quality_overhead.py                         # CPU, preset tiny
    python benchmarks/quality_overhead.py --preset wan2.1-1.3b --device cuda --seconds 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.memory_overhead import RandomText  # noqa: E402
from memflow.config import get_preset  # noqa: E402
from memflow.pipeline import MemFlowGenerator  # noqa: E402
from memflow.quality import QualityMeter, load_clip, load_dino  # noqa: E402
from memflow.script import parse_script  # noqa: E402
from memflow.transformer import build_transformer  # noqa: E402
from memflow.vae import WanVAE  # noqa: E402


def random_backbones(folder: Path) -> tuple[Path, Path]:
    """CLIP ViT-B/32 and DINO ViT-B/16 (transformers' default configs), random, in HF layout."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    from tests.quality_models import tokenizer

    clip, dino = folder / "clip", folder / "dino"
    tok = tokenizer(77)
    CLIPModel(CLIPConfig(text_config={"vocab_size": tok.eos_token_id + 1, "eos_token_id": tok.eos_token_id,
                                      "bos_token_id": tok.bos_token_id, "pad_token_id": tok.eos_token_id})
              ).save_pretrained(clip)
    tok.save_pretrained(clip)
    CLIPImageProcessor().save_pretrained(clip)  # shortest edge 224, centre crop 224
    ViTModel(ViTConfig(), add_pooling_layer=False).save_pretrained(dino)  # ViT-B/16, 224 px: DINO's backbone
    ViTImageProcessor().save_pretrained(dino)
    return clip, dino


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per segment (two segments)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clip-model")
    ap.add_argument("--dino-model")
    args = ap.parse_args()

    preset = get_preset(args.preset)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    net = build_transformer(preset.transformer, seed=0, device=device, dtype=dtype)
    vae = WanVAE.from_config(preset.vae).to(device)
    gen = MemFlowGenerator(net, RandomText(preset.transformer["text_dim"], preset.text_len), vae, preset,
                           device=args.device)
    script = parse_script({"segments": [{"prompt": "a red fox in the snow", "seconds": args.seconds},
                                        {"prompt": "the fox sleeps by a tree", "seconds": args.seconds}]})
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir, dino_dir = ((args.clip_model, args.dino_model) if args.clip_model and args.dino_model
                              else random_backbones(Path(tmp)))
        clip, dino = load_clip(clip_dir, device), load_dino(dino_dir, device)
    t0 = time.perf_counter()
    g = gen.generate(script)
    generate_s = time.perf_counter() - t0
    segments = [(s.video_start, s.video_end, s.prompt) for s in g.plan.segments]

    decode, metrics = [], {"flicker only": [], "CLIP + DINO": []}
    frames = 0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        frames = sum(1 for _ in gen.frames(g))
        decode.append(time.perf_counter() - t0)
        for name, (c, d) in (("flicker only", (None, None)), ("CLIP + DINO", (clip, dino))):
            meter = QualityMeter(segments, g.fps, clip=c, dino=d)
            for _ in meter.observe(gen.frames(g)):
                pass
            meter.result()
            metrics[name].append(meter.seconds)
    decode_s = statistics.median(decode)
    h, w = script.resolution or (preset.height, preset.width)
    print(f"preset {preset.name} {h}x{w}, {frames} frames, device {device}; backbones "
          f"{'given' if args.clip_model and args.dino_model else 'random CLIP ViT-B/32 + DINO ViT-B/16 at 224 px'}")
    print(f"generate {generate_s:.2f} s, decode {decode_s:.2f} s (median of {args.rounds})")
    for name, times in metrics.items():
        s = statistics.median(times)
        print(f"metrics {name:13} {s:7.3f} s/video  {1000 * s / frames:7.2f} ms/frame  "
              f"{100 * s / (generate_s + decode_s):6.1f}% of generate + decode")


if __name__ == "__main__":
    main()
