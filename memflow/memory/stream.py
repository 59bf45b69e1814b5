"""The memory of one video in flight: what each block's queries attend to, and what is kept.

    keys = [ memory: frame sink + memory bank (SMA-filtered) | local window | current chunk ]

The attention budget `local_attn_size` counts the sink: sink + past window + the
current chunk (3 + 6 + 3 frames), plus the bank (memflow-algorithm.md, section 2).
Where the paper and the reference code differ (which frames form the sink part of a
pass, how the bank is updated, how a prompt switch re-caches), the memory policy
decides (policy.py); this module keeps the tensors and builds the key list.
Bank frames are attended as they are, even when the window also holds them (as the
reference does: the bank is its own part of the key list). SMA chooses among the
memory frames (sink + bank) per head; the local frames are always attended.
"""
from __future__ import annotations

import torch

from ..config import MemoryConfig
from .bank import MemoryBank
from .nam import Ranker
from .policy import PassLayout, make_policy
from .prototype import Prototype, frame_means
from .sink import FrameSink
from .sma import gather_frames, sma_select
from .window import LocalWindow


class StreamMemory:
    def __init__(self, cfg: MemoryConfig, num_blocks: int, tokens_per_frame: int,
                 ranker: Ranker | None = None, video_id: str = "video"):
        self.cfg = cfg
        self.policy = make_policy(cfg)
        self.tokens_per_frame = tokens_per_frame
        self.sink = FrameSink(num_blocks, cfg.sink_size, tokens_per_frame)
        self.window = LocalWindow(num_blocks, cfg.window_past_frames, tokens_per_frame)
        self.bank = MemoryBank(num_blocks, cfg.bank_size) if cfg.uses_bank else None
        self.ranker = ranker
        self.video_id = video_id
        self.newest: Prototype | None = None  # the prototype recorded last
        self.newest_admitted = False  # whether it has entered the bank yet
        self.recorded = 0  # prototypes recorded so far
        self.written_end = 0  # frames [0, written_end) have been written by clean passes
        self.trace: list[dict] = []  # retrieval trace: bank frames per block after each update
        # SMA's picks on each cache-writing pass: [frame, how many (block, head) pairs attended it]
        self.sma_trace: list[dict] = []
        self._sma_picks: list[torch.Tensor] = []
        self.debug: list[dict] | None = None  # set to [] to log every attention context (tests)
        self.bank_version = 0  # bumps when the bank changes (invalidates the memory cache)
        self._memory_cache: dict[int, tuple] = {}
        self.passes = 0  # forward passes so far (debug entries name theirs)
        self._pass: dict = {}
        self._layout = PassLayout(0, 0, 0, 0)
        self._proto: dict[str, list] = {}
        self._chunk = 0  # the chunk a bank update or re-cache is for (traces name it)

    # -- one forward pass over a chunk (or a re-cache span) ------------------------------
    def begin_pass(self, frame_start: int, frames: int, write: bool, record: bool = False) -> None:
        recache = write and frame_start < self.written_end  # rewriting frames already written
        lay = self.policy.layout(frame_start, frames, recache, self.sink.held(), self.window.first)
        self._layout = lay
        self.passes += 1
        self._pass = dict(index=self.passes - 1, start=frame_start, frames=frames, write=write,
                          record=record and self.bank is not None, sink_frames=lay.sink_stored + lay.sink_own,
                          window=range(self.window.start, self.window.end))  # what it holds before this pass
        if self._pass["record"]:
            self._proto = {"k": [], "v": [], "means": []}
        if write:
            self.written_end = max(self.written_end, frame_start + frames)
            if lay.own_from < frames:
                self.window.advance(frame_start + lay.own_from, frames - lay.own_from)

    def keys(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, M, D] that the pass's queries q [B, H, N, D] attend,
        its own keys k and values v (after RoPE) included; a writing pass keeps its own."""
        T, lay, p = self.tokens_per_frame, self._layout, self._pass
        parts_k, parts_v = [], []
        memory = self._memory(block, k, v)
        chosen = None
        if memory is not None:
            mem_k, mem_v, mem_means, mem_frames = memory
            if self.cfg.uses_sma and mem_means.shape[2] > self.cfg.sma_top_k:
                chosen = sma_select(q.float().mean(2), mem_means, self.cfg.sma_top_k)
                mem_k, mem_v = gather_frames(mem_k, chosen, T), gather_frames(mem_v, chosen, T)
                if p["write"]:
                    self._sma_picks.append(mem_frames[chosen].flatten())
            parts_k.append(mem_k), parts_v.append(mem_v)
        window = self.window.k[block] is not None
        if window:
            parts_k.append(self.window.k[block]), parts_v.append(self.window.v[block])
        if lay.own_from < p["frames"]:
            parts_k.append(k[:, :, lay.own_from * T:]), parts_v.append(v[:, :, lay.own_from * T:])
        if self.debug is not None:  # memory frames are [0, sink_frames) + bank; SMA indexes them
            own = range(p["start"] + lay.own_from, p["start"] + p["frames"])
            self.debug.append(dict(index=p["index"], block=block, write=p["write"], start=p["start"],
                                   frames=p["frames"], sink_frames=p["sink_frames"],
                                   bank=list(self.bank.frames[block]) if self.bank is not None else [],
                                   sma=None if chosen is None else chosen.cpu(),
                                   local=(list(p["window"]) if window else []) + list(own)))
        if p["write"]:
            self._store(block, k, v)
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        return torch.cat(parts_k, 2), torch.cat(parts_v, 2)

    def _memory(self, block: int, k: torch.Tensor, v: torch.Tensor):
        """[sink | bank] keys, values, mean keys and frame numbers of a block. Without
        the pass's own keys in it, concatenated once and reused by every pass until the
        sink part, the sink or the bank changes."""
        lay, T = self._layout, self.tokens_per_frame
        key = (lay.sink_stored, self.sink.writes, self.bank_version)
        cached = self._memory_cache.get(block)
        if not lay.sink_own and cached is not None and cached[0] == key:
            return cached[1]
        mk, mv, means = [], [], []
        if lay.sink_stored:
            n = lay.sink_stored * T
            mk.append(self.sink.k[block][:, :, :n]), mv.append(self.sink.v[block][:, :, :n])
            means.append(self.sink.means[block][:, :, :lay.sink_stored])
        if lay.sink_own:
            n = lay.sink_own * T
            mk.append(k[:, :, :n]), mv.append(v[:, :, :n]), means.append(frame_means(k[:, :, :n], T))
        bank = self.bank.kv(block) if self.bank is not None else None
        frames = list(range(lay.sink_stored + lay.sink_own))  # the sink holds the video's first frames
        if bank is not None:
            mk.append(bank[0]), mv.append(bank[1]), means.append(bank[2])
            frames += self.bank.frames[block]
        memory = (torch.cat(mk, 2), torch.cat(mv, 2), torch.cat(means, 2),
                  torch.tensor(frames, device=mk[0].device)) if mk else None
        if not lay.sink_own:
            self._memory_cache[block] = (key, memory)
        return memory

    def _store(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a writing pass's keys/values: sink, window and prototype, as laid out."""
        T, lay = self.tokens_per_frame, self._layout
        if lay.sink_write:
            n = lay.sink_write * T
            self.sink.write(block, k[:, :, :n], v[:, :, :n], self._pass["start"])
        if lay.own_from < self._pass["frames"]:
            self.window.write(block, k[:, :, lay.own_from * T:], v[:, :, lay.own_from * T:])
        if self._pass["record"]:
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
            self.newest, self.newest_admitted = Prototype(self._pass["start"], **self._proto), False
            self.recorded += 1
            self._proto = {}

    # -- the bank ---------------------------------------------------------------------------
    def update_bank(self, text_descriptor: torch.Tensor, chunk: int, switch: bool = False) -> None:
        """NAM, before a chunk's first denoising step: the policy admits the newest
        prototype and drops what is least relevant to the coming text. `switch`: this
        chunk starts a new prompt."""
        self._chunk = chunk
        self.policy.update(self, text_descriptor, switch)

    def best(self, text_descriptor: torch.Tensor | None, keep: int) -> list[list[int]]:
        """Per block, the `keep` bank frames most relevant to the text, best first. With
        no text (an all-zero query: every score ties) the earliest slots."""
        if text_descriptor is None:
            return [list(ids[:keep]) for ids in self.bank.frames]
        return self.ranker.rank(self.video_id, text_descriptor, self.bank.frames, keep)

    def admit(self, keep: list[list[int]] | None) -> None:
        """Keep the listed frames per block (None: all), then append the newest prototype."""
        proto = self.newest
        if not self.newest_admitted:
            self.ranker.record(self.video_id, proto.frame, proto.descriptor(), {"chunk": self._chunk})
            self.newest_admitted = True
        before = [list(f) for f in self.bank.frames]
        if keep is not None:
            self.bank.retain(keep)
        self.bank.append(proto)
        if self.bank.frames != before:
            self.bank_version += 1
        self.trace.append({"chunk": self._chunk, "frames": [list(f) for f in self.bank.frames]})

    # -- prompt switches ----------------------------------------------------------------------
    def recache(self, start: int, text_descriptor: torch.Tensor):
        """A prompt switch at latent frame `start`: yields the (first frame, frames) spans
        to recompute at the clean-context timestep under the new prompt, in order."""
        self._chunk = start // self.cfg.frames_per_chunk
        return self.policy.recache(self, start, text_descriptor)

    def close(self) -> dict | None:
        """Release the video's ranking state; returns the ranker's retrieval summary."""
        if self.ranker is not None and self.bank is not None:
            return self.ranker.release(self.video_id)
        return None

    def nbytes(self) -> int:
        """Bytes of KV held (sink + window + bank + newest prototype), copies counted once."""
        tensors = [t for t in self.sink.k + self.sink.v + self.window.k + self.window.v if t is not None]
        if self.bank is not None:
            tensors += [t for col in self.bank.k + self.bank.v for t in col]
        if self.newest is not None:
            tensors += self.newest.k + self.newest.v
        unique = {id(t): t for t in tensors}
        return sum(t.numel() * t.element_size() for t in unique.values())
