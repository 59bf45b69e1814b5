"""The memory of one video in flight: what each block's queries attend to, and what is kept.

    keys = [ memory: frame sink + memory bank (SMA-filtered) | local window | current chunk ]

Conventions (memflow-algorithm.md, section 2; where the paper is silent, ours):
- The local window holds the most recent `local_attn_size - frames_per_chunk` past
  frames; the current chunk makes it `local_attn_size`.
- The sink is attended separately only for its frames older than the window (and
  than the current pass): while the first chunk is still recent it is simply part
  of the window, so no frame is attended twice through sink and window.
- Bank frames are attended as they are, even when the window also holds them (as the
  reference does: the bank is its own part of the key list).
- SMA chooses among the memory frames (sink + bank) per head; the window is always attended.
"""
from __future__ import annotations

import torch

from ..config import MemoryConfig
from .bank import MemoryBank
from .nam import Ranker
from .prototype import Prototype, frame_means
from .sink import FrameSink
from .sma import gather_frames, sma_select
from .window import LocalWindow


class StreamMemory:
    def __init__(self, cfg: MemoryConfig, num_blocks: int, tokens_per_frame: int,
                 ranker: Ranker | None = None, video_id: str = "video"):
        self.cfg = cfg
        self.tokens_per_frame = tokens_per_frame
        self.sink = FrameSink(num_blocks, cfg.sink_size, tokens_per_frame)
        self.window = LocalWindow(num_blocks, cfg.window_past_frames, tokens_per_frame)
        self.bank = MemoryBank(num_blocks, cfg.bank_size) if cfg.uses_bank else None
        self.ranker = ranker
        self.video_id = video_id
        self.pending: Prototype | None = None
        self.trace: list[dict] = []  # retrieval trace: bank frames per block after each update
        # SMA's picks on each cache-writing pass: [frame, how many (block, head) pairs attended it]
        self.sma_trace: list[dict] = []
        self._sma_picks: list[torch.Tensor] = []
        self.debug: list[dict] | None = None  # set to [] to log every attention context (tests)
        self.bank_version = 0  # bumps when the bank changes (invalidates the memory cache)
        self._memory_cache: dict[int, tuple] = {}
        self.passes = 0  # forward passes so far (debug entries name theirs)
        self._pass: dict = {}
        self._proto: dict[str, list] = {}

    # -- one forward pass over a chunk -------------------------------------------------
    def begin_pass(self, frame_start: int, frames: int, write: bool, record: bool = False) -> None:
        cutoff = self.window.start if self.window.end > self.window.start else frame_start
        self.passes += 1
        self._pass = dict(index=self.passes - 1, start=frame_start, frames=frames, write=write, record=record and self.bank is not None,
                          sink_frames=min(self.sink.held(), cutoff))
        if self._pass["record"]:
            self._proto = {"k": [], "v": [], "means": []}
        if write:
            self.window.advance(frame_start, frames)

    def context(self, block: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [B, H, M, D] the chunk's queries q [B, H, N, D] attend to
        besides themselves; None when there are none (the first chunk)."""
        memory = self._memory(block)
        parts_k, parts_v = [], []
        if memory is not None:
            mem_k, mem_v, mem_means, mem_frames = memory
            chosen = None
            if self.cfg.uses_sma and mem_means.shape[2] > self.cfg.sma_top_k:
                chosen = sma_select(q.float().mean(2), mem_means, self.cfg.sma_top_k)
                T = self.tokens_per_frame
                mem_k, mem_v = gather_frames(mem_k, chosen, T), gather_frames(mem_v, chosen, T)
                if self._pass["write"]:
                    self._sma_picks.append(mem_frames[chosen].flatten())
            parts_k.append(mem_k), parts_v.append(mem_v)
            if self.debug is not None:
                self.debug.append(dict(index=self._pass["index"], block=block, write=self._pass["write"],
                                       start=self._pass["start"], sink_frames=self._pass["sink_frames"],
                                       bank=list(self.bank.frames[block]) if self.bank is not None else [],
                                       sma=None if chosen is None else chosen.cpu()))
        if self.window.k[block] is not None:
            parts_k.append(self.window.k[block]), parts_v.append(self.window.v[block])
        if not parts_k:
            return None
        return torch.cat(parts_k, 2), torch.cat(parts_v, 2)

    def _memory(self, block: int):
        """[sink | bank] keys, values, mean keys and frame numbers of a block, concatenated
        once and reused by every pass until the sink cut-off or the bank changes."""
        key = (self._pass["sink_frames"], self.bank_version)
        cached = self._memory_cache.get(block)
        if cached is not None and cached[0] == key:
            return cached[1]
        T, n_sink = self.tokens_per_frame, self._pass["sink_frames"]
        mk, mv, means = [], [], []
        if n_sink:
            mk.append(self.sink.k[block][:, :, : n_sink * T])
            mv.append(self.sink.v[block][:, :, : n_sink * T])
            means.append(self.sink.means[block][:, :, :n_sink])
        bank = self.bank.kv(block) if self.bank is not None else None
        frames = list(range(n_sink))  # the sink holds the video's first frames
        if bank is not None:
            mk.append(bank[0]), mv.append(bank[1]), means.append(bank[2])
            frames += self.bank.frames[block]
        memory = (torch.cat(mk, 2), torch.cat(mv, 2), torch.cat(means, 2),
                  torch.tensor(frames, device=mk[0].device)) if mk else None
        self._memory_cache[block] = (key, memory)
        return memory

    def store(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the pass's keys/values (after RoPE) if it writes: sink, window, prototype."""
        if not self._pass["write"]:
            return
        self.sink.write(block, k, v, self._pass["start"])
        self.window.write(block, k, v)
        if self._pass["record"]:
            T = self.tokens_per_frame
            pk, pv = k[:, :, :T].clone(), v[:, :, :T].clone()
            self._proto["k"].append(pk), self._proto["v"].append(pv)
            self._proto["means"].append(frame_means(pk, T)[:, :, 0])

    def end_pass(self) -> None:
        if self._sma_picks:  # one host sync per writing pass, not one per block
            frames, counts = torch.cat(self._sma_picks).unique(return_counts=True)
            self.sma_trace.append({"start": self._pass["start"],
                                   "frames": [[f, n] for f, n in zip(frames.tolist(), counts.tolist())]})
            self._sma_picks = []
        if self._pass.get("record"):
            self.pending = Prototype(self._pass["start"], **self._proto)
            self._proto = {}

    # -- between chunks -----------------------------------------------------------------
    def update_bank(self, text_descriptor: torch.Tensor, chunk: int) -> None:
        """NAM: before a chunk's first denoising step, admit the pending prototype,
        dropping the bank frame least relevant to the coming text when full."""
        if self.pending is None:
            return
        proto, self.pending = self.pending, None
        self.ranker.record(self.video_id, proto.frame, proto.descriptor(), {"chunk": chunk})
        if self.bank.full:
            self.bank.retain(self.ranker.rank(self.video_id, text_descriptor, self.bank.frames,
                                              self.cfg.bank_size - 1))
        self.bank.append(proto)
        self.bank_version += 1
        self.trace.append({"chunk": chunk, "frames": [list(f) for f in self.bank.frames]})

    def start_recache(self) -> None:
        """A prompt switch: the window is recomputed under the new prompt; sink and bank stay."""
        self.window.clear()

    def close(self) -> dict | None:
        """Release the video's ranking state; returns the ranker's retrieval summary."""
        if self.ranker is not None and self.bank is not None:
            return self.ranker.release(self.video_id)
        return None

    def nbytes(self) -> int:
        """Bytes of KV held (sink + window + bank + pending prototype)."""
        tensors = [t for t in self.sink.k + self.sink.v + self.window.k + self.window.v if t is not None]
        if self.bank is not None:
            tensors += [t for col in self.bank.k + self.bank.v for t in col]
        if self.pending is not None:
            tensors += self.pending.k + self.pending.v
        return sum(t.numel() * t.element_size() for t in tensors)
