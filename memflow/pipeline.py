"""The generator: a script in, latents (and then an mp4) out, chunk by chunk.

Built once (weights loaded once), then `generate` script after script: a Ray
replica holds one `MemFlowGenerator` for its lifetime. Per script everything that
grows with the video lives in a `Story` (memflow/story.py): its memory, noise and
recent latents, a value that can be forked and rebuilt by replay; `render_tree`
(memflow/tree.py) renders a branching script with its shared chunks generated once.
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
from .sampler import denoising_sigmas
from .script import Plan, Script
from .settings import EngineSettings
from .story import ChunkEvent, RecentLatents, Story, chunk_keys
from .transformer import CausalWanTransformer, Compiled, Eager, build_transformer, place


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
    story: dict | None = None  # how its chunks were obtained (memflow/tree.py `accounting`)

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


def engine_fingerprint(preset: Preset, memory: MemoryConfig, weights: dict) -> str:
    """The model and its memory config: the preset, where the weights came from (as given:
    model, transformer, lora, the seed of random ones), the memory knobs and the sampler.
    Records carry it; every chunk key starts from it (memflow/story.py)."""
    return fingerprint({"preset": preset.name, "memory": memory.__dict__, "sigmas": denoising_sigmas(),
                        "weights": weights})


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
        self.weights: dict = {"model": None, "transformer": None, "lora": None, "seed": None}  # where they came from

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

        weights = {"model": model, "transformer": transformer, "lora": lora, "seed": seed}  # as given
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
        gen = cls(net, text, vae, preset, memory, device)
        gen.weights = weights
        return gen

    @classmethod
    def from_settings(cls, settings: "EngineSettings", **kwargs) -> "MemFlowGenerator":
        """Build a generator from the engine's typed settings (memflow/settings.py)."""
        preset = get_preset(settings.preset).with_memory(mode=settings.memory, fidelity=settings.fidelity)
        return cls.from_preset(preset, model=settings.model, transformer=settings.transformer, lora=settings.lora,
                               device=None if settings.device == "auto" else settings.device,
                               compile=settings.compile_flag, attention=settings.attention, **kwargs)

    @property
    def config_fingerprint(self) -> str:
        return engine_fingerprint(self.preset, self.memory, self.weights)

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

    def story(self, script: Script, ranker: Ranker | None = None, video_id: str | None = None,
              memory: StreamMemory | None = None) -> Story:
        """A story at chunk 0 (memflow/story.py): `step()` it chunk by chunk, `fork()` it
        where branches part, `replay()` chunks whose latents are known."""
        return Story(self, script, memory or self.memory_for(script, ranker, video_id))

    def chunk_keys(self, script: Script) -> list[str]:
        """Each chunk's content key: equal keys, equal computation (memflow/story.py)."""
        return chunk_keys(self.config_fingerprint, script, script.plan(self.memory.frames_per_chunk),
                          self.latent_shape(script))

    def chunks(self, script: Script, mem: StreamMemory) -> Iterator[tuple[ChunkEvent, torch.Tensor]]:
        """Generate a script chunk by chunk: yields (event, the chunk's final latents
        [1, C, F, h, w] on the device) as each chunk is done, so a consumer can decode it
        while the next one is generated, or step several generators in lockstep.

        The loop never waits for the device: noise is drawn on it (a generator seeded by
        the script), RoPE tables are built on it, the memory keeps its state and traces
        there. On a GPU the host runs ahead; `event.seconds` is host time."""
        story = Story(self, script, mem)
        while not story.done:
            yield story.step()

    def generate(self, script: Script, *, ranker: Ranker | None = None, video_id: str | None = None,
                 on_chunk: Callable[[ChunkEvent], None] | None = None, memory: StreamMemory | None = None,
                 frames_to: Callable[[Iterator[np.ndarray]], object] | None = None,
                 prefix: torch.Tensor | None = None) -> Generation:
        """Render a script's latents. `ranker` serves NAM (on the device, in process, by
        default; the Ray memory service in a cluster); `memory` lets tests inspect the state.
        `frames_to(frames)`: decode each chunk in a second thread while the next ones are
        generated and hand the uint8 RGB frames to it (an encoder, metrics); its return
        value is `Generation.decoded`. `prefix`: latents [1, C, n, h, w] of the first whole
        chunks, known from an earlier render of the same content (a video continued, a
        render resumed): they are replayed, not generated, and decoded into the video."""
        video_id = video_id or script.video_id
        story = self.story(script, ranker, video_id, memory)
        fpc = self.memory.frames_per_chunk
        known = list(prefix.split(fpc, dim=2)) if prefix is not None else []
        if known and (known[-1].shape[2] != fpc or len(known) > story.plan.num_chunks):
            raise ValueError(f"prefix: {prefix.shape[2]} latent frames are not whole chunks of this script "
                             f"({story.plan.num_chunks} chunks of {fpc})")
        pipe = ChunkPipe(self.device).start(lambda chunks: frames_to(self.vae.decode_stream(chunks))) \
            if frames_to is not None else None
        latents: list[torch.Tensor] = []
        clock = ChunkClock(self.device)
        retrieval = None
        try:
            clock.mark()
            while not story.done:
                if story.chunk < len(known):
                    x0 = known[story.chunk].to(self.device)
                    event = story.replay(x0)
                else:
                    event, x0 = story.step()
                clock.mark()
                latents.append(x0)
                if pipe is not None:
                    pipe.put(x0)
                if on_chunk is not None:
                    on_chunk(event)
        except BaseException:
            if pipe is not None:
                pipe.abort()
            raise
        finally:
            if memory is None:
                retrieval = story.memory.close()
        generated = time.perf_counter()
        decoded = pipe.finish() if pipe is not None else None
        n = story.plan.num_chunks
        return Generation(video_id, script, story.plan, torch.cat(latents, 2).float().cpu(), clock.seconds(),
                          story.memory.trace, story.peak_bytes, script.fps, retrieval, story.memory.sma_trace, decoded,
                          time.perf_counter() - generated,
                          story={"chunks": n, "replayed": len(known), "generated": n - len(known)})

    def _pass(self, mem: StreamMemory, x, timestep: float, start: int, text, write: bool, record: bool = False):
        frames = x.shape[2]
        mem.begin_pass(start, frames, write=write, record=record)
        t = torch.full((x.shape[0], frames), float(timestep), device=self.device)
        v = self.transformer.forward_chunk(x, t, start, text, mem)
        mem.end_pass()
        return v

    def _recache(self, mem: StreamMemory, recent: RecentLatents, text) -> None:
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
