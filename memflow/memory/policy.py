"""Memory policies: the two named behaviours of the memory where the paper and the
reference code that trained the released checkpoint differ (memflow-algorithm.md, section 7).

- `ReferencePolicy` ("reference", the default) reproduces the reference implementation
  (KlingTeam/MemFlow), which the official weights were trained and evaluated with.
- `PaperPolicy` ("paper") keeps the paper's clean semantics: each prototype enters the
  bank once, ranked against the prompt of the coming chunk; the sink is never
  overwritten; a prompt switch re-caches the window chunk by chunk.

Both count the sink in the attention budget: `local_attn_size` 12 = 3 sink + 6 past +
3 own frames (+ the bank). A policy decides three things, and nothing else differs:

  layout   which frames a pass attends as the sink, and which of its own frames it
           attends and keeps (section 7, items 2 and 3)
  update   how the bank changes before a chunk and at a switch (items 4 and 5)
  recache  the passes that re-cache the window at a prompt switch (items 3 and 6)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from ..config import MemoryConfig

if TYPE_CHECKING:
    from .stream import StreamMemory


@dataclass(frozen=True)
class PassLayout:
    """Where one pass's keys come from, and where its own keys go.

    The pass attends [sink | bank] (the memory, which SMA may filter) and then its
    local frames (the window's past frames and its own frames from `own_from` on)."""

    sink_stored: int  # the video's first frames, read from the sink store
    sink_own: int  # the pass's own first frames, attended as the sink part of the memory
    own_from: int  # own frames before this index are not attended as local frames
    sink_write: int  # own frames (from the pass's first) that a writing pass stores in the sink


class ReferencePolicy:
    """What the released checkpoint runs with.

    - The sink is always its own part of the memory, also while it is recent (SMA
      chooses among [sink | bank] from chunk 1 on), and never part of the window. A
      pass that covers the sink frames (the first chunk, a re-cache from frame 0)
      attends its own keys of those frames as the sink, and stores them.
    - Once more than `bank_size` prototypes were recorded, every chunk's first step
      (and a re-cache) compresses the bank again: the best `bank_size - 1` slots, best
      first, then the newest prototype, so a bank can hold copies ([27, 27, 27]).
    - At a switch both updates score against an all-zero text query: every score ties
      and the earliest slots are kept.
    - The re-cache is one pass over the last min(local_attn_size, start) frames, after
      the bank update; it keeps its last `local_attn_size - sink_size` frames, and
      overwrites the sink when it starts at frame 0."""

    name = "reference"

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def layout(self, start: int, frames: int, recache: bool, sink_held: int, window_first: int | None) -> PassLayout:
        cfg = self.cfg
        owns_sink = start < cfg.sink_size and (start == 0 or not recache)  # else the sink is protected
        sink_own = min(cfg.sink_size, start + frames) - start if owns_sink else 0
        sink_stored = min(sink_held, start) if owns_sink else sink_held
        own_from = max(sink_own, frames - cfg.local_frames)
        return PassLayout(sink_stored, sink_own, own_from, sink_write=sink_own)

    def update(self, mem: "StreamMemory", text: torch.Tensor, switch: bool) -> None:
        if mem.newest is None:
            return
        if mem.recorded <= mem.bank.capacity:  # the newest prototype goes to its own slot
            if not mem.newest_admitted:
                mem.admit(None)
            return
        query = None if switch else text  # the cross-attention cache was cleared at the switch
        mem.admit(mem.best(query, mem.bank.capacity - 1))

    def recache(self, mem: "StreamMemory", start: int, text: torch.Tensor) -> Iterator[tuple[int, int]]:
        if mem.bank is not None:
            self.update(mem, text, switch=True)  # before the re-cached frames are computed
        frames = min(self.cfg.local_attn_size, start)
        mem.window.clear()
        yield start - frames, frames


class PaperPolicy:
    """The paper's semantics, with the sink counted in the attention budget.

    - The sink is part of the window while it is recent and attended separately once
      it is older (no frame is attended twice through sink and window); it is written
      once, by the first clean pass, and never overwritten.
    - Each prototype enters the bank once, before the chunk after its recording; a full
      bank drops its frame least relevant to the coming chunk's prompt (the new prompt
      at a switch), the rest keep their order.
    - A switch re-caches the window's frames chunk by chunk under the new prompt,
      leaving sink and bank as they are; the bank update follows."""

    name = "paper"

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def layout(self, start: int, frames: int, recache: bool, sink_held: int, window_first: int | None) -> PassLayout:
        cutoff = start if window_first is None else window_first
        extends = start == sink_held < self.cfg.sink_size
        sink_write = min(self.cfg.sink_size, start + frames) - start if extends else 0
        return PassLayout(min(sink_held, cutoff), 0, 0, sink_write)

    def update(self, mem: "StreamMemory", text: torch.Tensor, switch: bool) -> None:
        if mem.newest is None or mem.newest_admitted:
            return
        keep = None
        if mem.bank.full:  # the best, in the order they were held
            keep = mem.best(text, mem.bank.capacity - 1).sort(dim=1).values
        mem.admit(keep)

    def recache(self, mem: "StreamMemory", start: int, text: torch.Tensor) -> Iterator[tuple[int, int]]:
        first, end = mem.window.start, mem.window.end
        mem.window.clear()
        fpc = self.cfg.frames_per_chunk
        for s in range(first, end, fpc):
            yield s, min(fpc, end - s)


POLICIES = {p.name: p for p in (ReferencePolicy, PaperPolicy)}


def make_policy(cfg: MemoryConfig):
    return POLICIES[cfg.fidelity](cfg)
