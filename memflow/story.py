"""The state of a story at a chunk boundary, as a value: advance it, fork it, rebuild it.

A story is one flattened script being generated. After chunk c-1, all that chunk c
depends on is this state and the chunk's own content (its prompt, whether a segment
starts there and that segment's seed): the memory (KV cache of sink, bank and window,
NAM's state: memory/stream.py), the noise generator, the recent latents a prompt switch
re-caches from, and the current prompt's text context.

- `step()` generates the next chunk: 4 denoising passes, then the clean pass that
  writes the caches;
- `replay(x0)` rebuilds the state after a chunk whose latents are known by running only
  what writes the caches: the prompt's re-cache at a switch, the bank update, the clean
  pass (MemFlow's `context_noise` is 0: one pass where generating takes five); the
  noise generator advances by the draws the chunk made, so what follows is unchanged;
- `fork(stream_id)` copies the state; each copy then goes on by itself (a branching
  script generates its shared chunks once). The memory's ranking service entries fork
  with it, under the new stream id.

`chunk_keys` is where the project decides, once, whether two scripts compute a chunk
identically: a chained hash of everything the computation up to that chunk depends on
(the engine's fingerprint: preset, weights, memory config; the seed, resolution and fps;
each chunk's prompt, segment starts and segment seeds). Equal keys mean equal latents
(on the same device and dtype, and on a CPU with the same intra-op thread count: replicas
all run with one CPU), as prefix caches of LLM serving are keyed: sharing, replay and
resume all go by these keys and never change an output.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass

import torch

from .sampler import TRAIN_STEPS, sample_chunk
from .script import Plan, Script


@dataclass
class ChunkEvent:
    """Progress: sent after each chunk generated or replayed."""

    chunk: int
    num_chunks: int
    seconds: float
    segment: int
    replayed: bool = False


def segment_seed(script_seed: int, seed: int) -> int:
    """The noise seed from a segment on: a stable mix of the script's seed and the segment's."""
    digest = hashlib.blake2b(f"{script_seed}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def chunk_keys(engine: str, script: Script, plan: Plan, latent_shape: tuple[int, int]) -> list[str]:
    """One key per chunk of `script`: equal keys at chunk c <=> the same computation up to
    and including chunk c (see the module docstring). `engine`: the generator's fingerprint."""
    h = hashlib.sha256(json.dumps([engine, script.seed, list(latent_shape), script.fps]).encode())
    keys = []
    for c in range(plan.num_chunks):
        seg = plan.segment_at(c)
        event = ["segment", seg.prompt, script.segments[seg.index].seed] if c == seg.start_chunk else ["chunk"]
        h.update(json.dumps(event).encode())
        keys.append(h.copy().hexdigest())
    return keys


class Noise:
    """A story's noise: a generator on the device seeded by the script, reseeded where a
    segment carries a seed of its own."""

    def __init__(self, device: torch.device, seed: int):
        self.generator = torch.Generator(device).manual_seed(seed)

    def draw(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def fork(self) -> "Noise":
        other = copy.copy(self)
        other.generator = torch.Generator(self.generator.device)
        other.generator.set_state(self.generator.get_state())
        return other


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

    def fork(self) -> "RecentLatents":
        other = copy.copy(self)
        other.chunks = list(self.chunks)  # the tensors are never written in place
        return other


class Story:
    """One story at a chunk boundary (`chunk`: the next to compute). `gen` is the
    MemFlowGenerator; `memory` a fresh StreamMemory (gen.memory_for) at chunk 0."""

    def __init__(self, gen, script: Script, memory):
        self.gen, self.memory = gen, memory
        self.follow(script)
        cfg = gen.memory
        h, w = gen.latent_shape(script)
        self.shape = (1, gen.transformer.config.in_channels, cfg.frames_per_chunk, h, w)
        self.chunk = 0
        self.noise = Noise(gen.device, script.seed)
        self.recent = RecentLatents(cfg.local_attn_size)
        self.text = None
        self.peak_bytes = 0  # KV held by the memory at its largest

    def follow(self, script: Script) -> None:
        """Take the chunks to come from `script` (a story that forks goes on as one of its
        branches: the same chunks so far, by their keys)."""
        self.script, self.plan = script, script.plan(self.gen.memory.frames_per_chunk)

    @property
    def done(self) -> bool:
        return self.chunk >= self.plan.num_chunks

    def step(self) -> tuple[ChunkEvent, torch.Tensor]:
        """Generate the next chunk: (event, its final latents [1, C, F, h, w] on the device)."""
        t0 = time.perf_counter()
        seg, start = self._enter()
        gen, mem = self.gen, self.memory

        def flow(x, timestep):
            return gen._pass(mem, x, timestep, start, self.text, write=False)

        x0 = sample_chunk(flow, self.noise.draw(self.shape), gen.step_sigmas, lambda: self.noise.draw(self.shape))
        self._write(x0, start)
        return ChunkEvent(self.chunk - 1, self.plan.num_chunks, time.perf_counter() - t0, seg.index), x0

    def replay(self, x0: torch.Tensor) -> ChunkEvent:
        """Rebuild the state after the next chunk from its known latents (float32, as
        generated): the cache-writing passes only."""
        t0 = time.perf_counter()
        seg, start = self._enter()
        for _ in self.gen.step_sigmas:  # the draws its denoising steps made
            self.noise.draw(self.shape)
        self._write(x0.to(self.gen.device), start)
        return ChunkEvent(self.chunk - 1, self.plan.num_chunks, time.perf_counter() - t0, seg.index, replayed=True)

    def fork(self, stream_id: str) -> "Story":
        """An independent copy of this state; its memory (and ranking entries) under `stream_id`."""
        other = copy.copy(self)
        other.memory = self.memory.fork(stream_id)
        other.noise = self.noise.fork()
        other.recent = self.recent.fork()
        return other

    # -- one chunk -------------------------------------------------------------------------
    def _enter(self):
        """What comes before a chunk's passes: at a segment start its seed and prompt, at a
        switch the re-cache; then the bank update."""
        gen, c = self.gen, self.chunk
        seg = self.plan.segment_at(c)
        switch = c == seg.start_chunk and c > 0
        if c == seg.start_chunk:
            seed = self.script.segments[seg.index].seed
            if seed is not None:
                self.noise.reseed(segment_seed(self.script.seed, seed))
            self.text = gen.transformer.text_context(gen.text_encoder.encode([seg.prompt]).to(gen.device))
            if switch:
                gen._recache(self.memory, self.recent, self.text)
        if self.memory.bank is not None:
            self.memory.update_bank(self.text.descriptor, c, switch)
        return seg, c * gen.memory.frames_per_chunk

    def _write(self, x0: torch.Tensor, start: int) -> None:
        """The clean pass at the context timestep: it alone writes the chunk into the caches."""
        gen, cfg = self.gen, self.gen.memory
        context = x0
        if cfg.context_noise > 0:
            sigma = cfg.context_noise / TRAIN_STEPS
            context = (1 - sigma) * x0 + sigma * self.noise.draw(self.shape)
        gen._pass(self.memory, context, cfg.context_noise, start, self.text, write=True,
                  record=self.chunk % cfg.record_interval == 0)
        self.recent.add(x0)
        self.chunk += 1
        self.peak_bytes = max(self.peak_bytes, self.memory.nbytes())
