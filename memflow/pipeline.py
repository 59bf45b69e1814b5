"""The generator: a script in, latents (and then an mp4) out, chunk by chunk.

Built once (weights loaded once), then `generate` script after script: a Ray
replica holds one `MemFlowGenerator` for its lifetime. Per script everything that
grows with the video (the memory) lives in a fresh `StreamMemory`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .attention import AttentionBackend
from .chunkpipe import ChunkPipe
from .config import MemoryConfig, Preset, fingerprint, get_preset
from .memory import Ranker, StreamMemory
from .sampler import TRAIN_STEPS, denoising_sigmas, sample_chunk
from .script import Plan, Script
from .transformer import CausalWanTransformer, Compiled, Eager, build_transformer, place


@dataclass
class ChunkEvent:
    """Progress of one script: sent after each chunk."""

    chunk: int
    num_chunks: int
    seconds: float
    segment: int


@dataclass
class Generation:
    video_id: str
    script: Script
    plan: Plan
    latents: torch.Tensor  # [1, 16, L, h, w] float32, CPU
    chunk_seconds: list[float]
    trace: list[dict]  # bank frames per block after each NAM update
    peak_memory_bytes: int  # KV held by sink + window + bank at its largest
    fps: int
    retrieval: dict | None = None  # the ranker's summary: recorded frames, what each NAM update kept
    sma_trace: list[dict] = field(default_factory=list)  # memory frames SMA attended, per writing pass
    decoded: object = None  # what `frames_to` returned (decoding ran alongside generation)
    decode_tail_seconds: float = 0.0  # how long decoding went on after the last chunk was generated

    @property
    def seconds(self) -> float:
        return sum(self.chunk_seconds)

    @property
    def generation_fps(self) -> float:
        """Video frames generated per second of denoising (decode excluded)."""
        return self.plan.num_video_frames / max(self.seconds, 1e-9)


@dataclass
class RenderResult:
    generation: Generation
    frames: int
    decode_seconds: float  # decoding and encoding that went on after the last chunk (they overlap generation)
    path: str = ""


class ChunkClock:
    """Seconds per chunk without waiting for the device: CUDA events on a GPU, read once
    at the end; the host clock on the CPU (where work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class RecentLatents:
    """The last `frames` latent frames generated: what a prompt switch re-caches from."""

    def __init__(self, frames: int):
        self.frames = frames
        self.chunks: list[torch.Tensor] = []
        self.end = 0  # latent frames generated so far

    def add(self, x: torch.Tensor) -> None:
        self.chunks.append(x)
        self.end += x.shape[2]
        while sum(c.shape[2] for c in self.chunks[1:]) >= self.frames:
            self.chunks.pop(0)

    def span(self, first: int, end: int) -> torch.Tensor:
        """Frames [first, end) of the video, [1, C, n, h, w]."""
        held = torch.cat(self.chunks, 2)
        offset = self.end - held.shape[2]
        if first < offset:
            raise ValueError(f"frame {first} is no longer held (the last {self.frames} are)")
        return held[:, :, first - offset:end - offset]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class MemFlowGenerator:
    def __init__(self, transformer: CausalWanTransformer, text_encoder, vae, preset: Preset,
                 memory: MemoryConfig | None = None, device: str = "cpu"):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.preset = preset
        self.memory = memory or preset.memory
        self.device = torch.device(device)
        self.step_sigmas = denoising_sigmas()

    @classmethod
    def from_preset(cls, preset: str | Preset = "tiny", *, model: str | None = None, transformer: str | None = None,
                    lora: str | None = None, memory: MemoryConfig | None = None, device: str | None = None,
                    dtype: torch.dtype | None = None, seed: int = 0, compile: bool | None = None,
                    attention: str = "auto", vae_dtype: torch.dtype | None = None) -> "MemFlowGenerator":
        """Build a generator. Random weights (seeded) unless weights are given:
        `model`: a directory or URL in diffusers' Wan layout (transformer/, vae/,
        text_encoder/, tokenizer/), optionally with MemFlow's base.pt and lora.pt at
        its top level; `transformer` / `lora`: override the transformer weights
        (diffusers folder, .safetensors/.pt/.pth, or MemFlow base.pt) and the LoRA.

        On a GPU the defaults are the fast path: transformer and VAE in bfloat16, the
        blocks compiled (`compile=False` runs them eager), `attention` "auto" (see
        memflow/attention.py). On the CPU: float32, eager."""
        from .text import build_text_encoder
        from .vae import WanVAE
        from .weights import load_transformer_weights, resolve

        preset = get_preset(preset) if isinstance(preset, str) else preset
        device = device or default_device()
        gpu = str(device).startswith("cuda")
        dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
        vae_dtype = vae_dtype or (torch.bfloat16 if gpu else torch.float32)
        model_dir = resolve(model) if model else None
        if model_dir is not None:
            if transformer is None:
                transformer = str(model_dir / "base.pt") if (model_dir / "base.pt").exists() else str(model_dir)
            if lora is None and (model_dir / "lora.pt").exists():
                lora = str(model_dir / "lora.pt")
        net = build_transformer(preset.transformer, seed=seed, device="cpu", dtype=torch.float32)
        if transformer is not None:
            load_transformer_weights(net, transformer, lora=lora)
        elif lora is not None:
            raise ValueError("--lora needs base weights: give --model or --transformer too")
        net = place(net, device, dtype)
        net.execution = Compiled() if (gpu if compile is None else compile) else Eager()
        net.attention = AttentionBackend(attention).check(torch.device(device), dtype, net.head_dim)
        text = build_text_encoder(preset, str(model_dir) if model_dir else None, device=device, dtype=dtype)
        # Random-weight presets take the VAE from the model folder only when it has one
        # (a folder may carry just a transformer); the official preset always needs it.
        real_vae = model_dir is not None and (preset.text_encoder == "umt5" or (model_dir / "vae").exists())
        vae = (WanVAE.from_pretrained(str(model_dir), device=device, dtype=vae_dtype) if real_vae
               else WanVAE.from_config(preset.vae, seed=seed).to(device, vae_dtype))
        return cls(net, text, vae, preset, memory, device)

    @property
    def config_fingerprint(self) -> str:
        return fingerprint({"preset": self.preset.name, "memory": self.memory.__dict__,
                            "sigmas": self.step_sigmas})

    @property
    def fidelity(self) -> str:
        return self.memory.fidelity

    # -- generation -----------------------------------------------------------------------
    def latent_shape(self, script: Script) -> tuple[int, int]:
        height, width = script.resolution or (self.preset.height, self.preset.width)
        return height // 8, width // 8

    def memory_for(self, script: Script, ranker: Ranker | None = None, video_id: str | None = None) -> StreamMemory:
        """A fresh memory for one script: everything that grows with a video lives in it."""
        h, w = self.latent_shape(script)
        p = self.transformer.config.patch_size
        return StreamMemory(self.memory, len(self.transformer.blocks), (h // p[1]) * (w // p[2]),
                            ranker, video_id or script.video_id)

    def chunks(self, script: Script, mem: StreamMemory) -> Iterator[tuple[ChunkEvent, torch.Tensor]]:
        """Generate a script chunk by chunk: yields (event, the chunk's final latents
        [1, C, F, h, w] on the device) as each chunk is done, so a consumer can decode it
        while the next one is generated, or step several generators in lockstep.

        The loop never waits for the device: noise is drawn on it (a generator seeded by
        the script), RoPE tables are built on it, the memory keeps its state and traces
        there. On a GPU the host runs ahead; `event.seconds` is host time."""
        cfg, fpc = self.memory, self.memory.frames_per_chunk
        plan = script.plan(fpc)
        h, w = self.latent_shape(script)
        rng = torch.Generator(self.device).manual_seed(script.seed)
        shape = (1, self.transformer.config.in_channels, fpc, h, w)

        def noise():
            return torch.randn(shape, generator=rng, device=self.device)

        recent = RecentLatents(cfg.local_attn_size)
        text = None
        for c in range(plan.num_chunks):
            t0 = time.perf_counter()
            seg = plan.segment_at(c)
            start = c * fpc
            switch = c == seg.start_chunk and c > 0
            if c == seg.start_chunk:
                text = self.transformer.text_context(self.text_encoder.encode([seg.prompt]).to(self.device))
                if switch:
                    self._recache(mem, recent, text)
            if mem.bank is not None:
                mem.update_bank(text.descriptor, c, switch)

            def flow(x, timestep):
                return self._pass(mem, x, timestep, start, text, write=False)

            x0 = sample_chunk(flow, noise(), self.step_sigmas, noise)
            context = x0
            if cfg.context_noise > 0:
                sigma = cfg.context_noise / TRAIN_STEPS
                context = (1 - sigma) * x0 + sigma * noise()
            self._pass(mem, context, cfg.context_noise, start, text, write=True,
                       record=c % cfg.record_interval == 0)
            recent.add(x0)
            yield ChunkEvent(c, plan.num_chunks, time.perf_counter() - t0, seg.index), x0

    def generate(self, script: Script, *, ranker: Ranker | None = None, video_id: str | None = None,
                 on_chunk: Callable[[ChunkEvent], None] | None = None, memory: StreamMemory | None = None,
                 frames_to: Callable[[Iterator[np.ndarray]], object] | None = None) -> Generation:
        """Render a script's latents. `ranker` serves NAM (on the device, in process, by
        default; the Ray memory service in a cluster); `memory` lets tests inspect the state.
        `frames_to(frames)`: decode each chunk in a second thread while the next ones are
        generated and hand the uint8 RGB frames to it (an encoder, metrics); its return
        value is `Generation.decoded`."""
        video_id = video_id or script.video_id
        mem = memory or self.memory_for(script, ranker, video_id)
        pipe = ChunkPipe(self.device).start(lambda chunks: frames_to(self.vae.decode_stream(chunks))) \
            if frames_to is not None else None
        latents: list[torch.Tensor] = []
        clock = ChunkClock(self.device)
        peak, retrieval = 0, None
        try:
            clock.mark()
            for event, x0 in self.chunks(script, mem):
                clock.mark()
                latents.append(x0)
                if pipe is not None:
                    pipe.put(x0)
                peak = max(peak, mem.nbytes())
                if on_chunk is not None:
                    on_chunk(event)
        except BaseException:
            if pipe is not None:
                pipe.abort()
            raise
        finally:
            if memory is None:
                retrieval = mem.close()
        generated = time.perf_counter()
        decoded = pipe.finish() if pipe is not None else None
        return Generation(video_id, script, script.plan(self.memory.frames_per_chunk),
                          torch.cat(latents, 2).float().cpu(), clock.seconds(), mem.trace, peak, script.fps,
                          retrieval, mem.sma_trace, decoded, time.perf_counter() - generated)

    def _pass(self, mem: StreamMemory, x, timestep: float, start: int, text, write: bool, record: bool = False):
        frames = x.shape[2]
        mem.begin_pass(start, frames, write=write, record=record)
        t = torch.full((x.shape[0], frames), float(timestep), device=self.device)
        v = self.transformer.forward_chunk(x, t, start, text, mem)
        mem.end_pass()
        return v

    def _recache(self, mem: StreamMemory, recent: "RecentLatents", text) -> None:
        """LongLive's KV re-cache at a prompt switch: recompute recent frames from the
        generated latents at the clean-context timestep under the new prompt, so the next
        chunk continues the motion under the new text. Which frames, in how many passes,
        and what they overwrite is the memory policy's call (memory/policy.py)."""
        for first, frames in mem.recache(recent.end, text.descriptor):
            span = recent.span(first, first + frames).to(self.device, self.transformer.dtype)
            self._pass(mem, span, self.memory.context_noise, first, text, write=True)

    # -- decoding ---------------------------------------------------------------------------
    def frames(self, generation: Generation) -> Iterator[np.ndarray]:
        """Decoded uint8 RGB frames, streamed (memory bounded for long videos)."""
        return self.vae.decode_stream(generation.latents)

    def render(self, script: Script, dest: str | Path, crf: int = 18, **kwargs) -> RenderResult:
        """Generate, decode and write an mp4 (a local path or a writable binary file object);
        chunks are decoded and encoded while the next ones are generated."""
        from .video import write_mp4

        gen = self.generate(script, frames_to=lambda frames: write_mp4(frames, dest, fps=script.fps, crf=crf),
                            **kwargs)
        return RenderResult(gen, gen.decoded, gen.decode_tail_seconds,
                            str(dest) if isinstance(dest, (str, Path)) else "")
