"""The memory of one video in flight: what each block's queries attend to, and what is kept.

    keys = [ memory: frame sink + memory bank (SMA-filtered) | local window | current chunk ]

The attention budget `local_attn_size` counts the sink: sink + past window + the
current chunk (3 + 6 + 3 frames), plus the bank (memflow-algorithm.md, section 2).
Where the paper and the reference code differ (which frames form the sink part of a
pass, how the bank is updated, how a prompt switch re-caches), the memory policy
decides (policy.py). The keys live in one preallocated KV cache (cache.py): a pass
writes its own keys into their slots and attends the whole cache, invalid slots
masked, or one gather of it with SMA. Bank frames are attended as they are, even when
the window also holds them (as the reference does). SMA chooses among the memory
frames (sink + bank) per head; the local frames are always attended.

Nothing here reads the device back during generation: bank updates, the in-process
NAM ranking and the traces stay on the device, and the traces are read once, when
asked for (after the video). Only a ranking service (`ranker`) needs a round trip:
descriptors out, frame ids back.
"""
from __future__ import annotations

import copy

import torch

from ..config import MemoryConfig
from .bank import MemoryBank
from .cache import KVCache
from .nam import Ranker, rank_slots
from .policy import PassLayout, make_policy
from .prototype import Prototype, frame_means
from .sink import FrameSink
from .sma import gather_frames, sma_select
from .window import LocalWindow


class StreamMemory:
    def __init__(self, cfg: MemoryConfig, num_blocks: int, tokens_per_frame: int,
                 ranker: Ranker | None = None, video_id: str = "video"):
        """`ranker`: a NAM ranking service (the Ray memory service, or an `InProcessRanker`);
        None ranks on the device, in process."""
        self.cfg = cfg
        self.policy = make_policy(cfg)
        self.tokens_per_frame = tokens_per_frame
        self.cache = KVCache(cfg, num_blocks, tokens_per_frame)
        self.sink = FrameSink(self.cache)
        self.window = LocalWindow(self.cache)
        self.bank = MemoryBank(self.cache) if cfg.uses_bank else None
        self.ranker = ranker
        self.video_id = video_id
        self.newest: Prototype | None = None  # the prototype recorded last
        self.newest_admitted = False  # whether it has entered the bank yet
        self.recorded = 0  # prototypes recorded so far
        self.written_end = 0  # frames [0, written_end) have been written by clean passes
        self.debug: list[dict] | None = None  # set to [] to log every attention context (tests)
        self.passes = 0  # forward passes so far (debug entries name theirs)
        self._pass: dict = {}
        self._layout = PassLayout(0, 0, 0, 0)
        self._proto: tuple | None = None  # the prototype buffers (k, v, means), reused record after record
        self._chunk = 0  # the chunk a bank update or re-cache is for (traces name it)
        self._admitted_chunk = 0  # the chunk of the latest first admission (the ranking summary names it)
        # device-side traces, read back when asked for
        self._bank_trace: list[tuple[int, torch.Tensor]] = []  # (chunk, bank frames [L, n]) after each update
        self._sma_trace: list[tuple[int, torch.Tensor]] = []  # (pass start, frames SMA attended)
        self._sma_picks: list[torch.Tensor] = []
        self._admitted: list[int] = []  # frames admitted to the bank (in-process ranking summary)
        self._rankings: list[tuple[int, torch.Tensor]] = []  # (chunk of the newest admission, kept frames)

    # -- one forward pass over a chunk (or a re-cache span) ------------------------------
    def begin_pass(self, frame_start: int, frames: int, write: bool, record: bool = False) -> None:
        c = self.cache
        recache = write and frame_start < self.written_end  # rewriting frames already written
        lay = self.policy.layout(frame_start, frames, recache, self.sink.held, self.window.first)
        self._layout = lay
        local = frames - lay.own_from
        window = self.window.held_slots()
        if local > c.pass_slots and window:
            raise ValueError("a pass longer than a chunk must start from an empty window")
        fill = self.bank.fill if self.bank is not None else 0
        memory = lay.sink_stored + lay.sink_own
        region = c.window_slots + c.pass_slots  # [window | pass]: held past frames, then own frames at its end
        valid = ([s < memory for s in range(c.sink_slots)] + [s < fill for s in range(c.bank_slots)]
                 + [c.local_slot + i in window or i >= region - local for i in range(region)])
        self.passes += 1
        self._pass = dict(index=self.passes - 1, start=frame_start, frames=frames, write=write,
                          record=record and self.bank is not None, sink_frames=memory, valid=tuple(valid),
                          sma=self.cfg.uses_sma and memory + fill > self.cfg.sma_top_k,
                          window=range(self.window.start, self.window.end))  # what it holds before this pass
        if write:
            self.written_end = max(self.written_end, frame_start + frames)
            if local:
                self.window.advance(frame_start + lay.own_from, local)

    def keys(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Keys, values [B, H, M, D] and a boolean mask (None: attend all) for the pass's
        queries q [B, H, N, D]; its own keys k and values v (after RoPE) are put in
        their slots first. Call `store` after attending."""
        c, T, lay, p = self.cache, self.tokens_per_frame, self._layout, self._pass
        if not c.allocated:
            c.allocate(k)
        if lay.sink_own:  # the pass's own first frames are the sink it attends (reference)
            n = lay.sink_own * T
            self.sink.write(block, k[:, :, :n], v[:, :, :n], p["start"])
        local = p["frames"] - lay.own_from
        if local:  # own local frames: the last slots of [window | pass]
            dst = slice((c.slots - local) * T, c.slots * T)
            c.k[block][:, :, dst] = k[:, :, lay.own_from * T:]
            c.v[block][:, :, dst] = v[:, :, lay.own_from * T:]
        valid, chosen = p["valid"], None
        if p["sma"]:
            top_k = self.cfg.sma_top_k
            memory_valid = c.constant(("memory", valid[:c.memory_slots]), lambda: torch.tensor(valid[:c.memory_slots]))
            chosen = sma_select(q.float().mean(2), c.means[block], top_k, memory_valid)
            local_slots = c.constant(("local", c.memory_slots), lambda: torch.arange(c.memory_slots, c.slots))
            index = torch.cat([chosen, local_slots.expand(*chosen.shape[:2], -1)], -1)
            keys, values = gather_frames(c.k[block], index, T), gather_frames(c.v[block], index, T)
            seen = (True,) * top_k + valid[c.memory_slots:]
            if p["write"]:
                self._sma_picks.append(c.slot_frames[block][chosen])
        else:
            keys, values, seen = c.k[block], c.v[block], valid
        mask = None if all(seen) else c.constant(
            ("mask", seen), lambda: torch.tensor(seen).repeat_interleave(T)[None, None, None])
        if self.debug is not None:
            self._log(block, chosen)
        return keys, values, mask

    def store(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """After attending: a writing pass keeps its keys/values in sink, window and prototype."""
        p, lay, T = self._pass, self._layout, self.tokens_per_frame
        if not p["write"]:
            return
        if lay.sink_write and not lay.sink_own:
            n = lay.sink_write * T
            self.sink.write(block, k[:, :, :n], v[:, :, :n], p["start"])
        if lay.own_from < p["frames"]:
            self.window.write(block, k[:, :, lay.own_from * T:], v[:, :, lay.own_from * T:])
        if p["record"]:
            if self._proto is None:
                b, h, _, d = k.shape
                L = self.cache.num_blocks
                self._proto = (k.new_empty(L, b, h, T, d), v.new_empty(L, b, h, T, d),
                               torch.empty(L, b, h, d, device=k.device))
            pk, pv, pm = self._proto
            pk[block], pv[block] = k[:, :, :T], v[:, :, :T]
            pm[block] = frame_means(k[:, :, :T], T)[:, :, 0]

    def end_pass(self) -> None:
        p, lay = self._pass, self._layout
        written = max(lay.sink_own, lay.sink_write)
        if p["write"] and written:
            self.sink.held = max(self.sink.held, p["start"] + written)
        if self._sma_picks:
            self._sma_trace.append((p["start"], torch.stack(self._sma_picks)))
            self._sma_picks = []
        if p["record"]:
            self.newest, self.newest_admitted = Prototype(p["start"], *self._proto), False
            self.recorded += 1

    def _log(self, block: int, chosen: torch.Tensor | None) -> None:
        """A debug entry: memory frames are [0, sink_frames) + bank, SMA's picks index them."""
        p, lay, c = self._pass, self._layout, self.cache
        memory_slots = [s for s in range(c.memory_slots) if p["valid"][s]]
        sma = None
        if chosen is not None:
            position = torch.tensor([memory_slots.index(s) if s in memory_slots else -1 for s in range(c.memory_slots)])
            sma = position[chosen.cpu()]
        own = range(p["start"] + lay.own_from, p["start"] + p["frames"])
        self.debug.append(dict(index=p["index"], block=block, write=p["write"], start=p["start"],
                               frames=p["frames"], sink_frames=p["sink_frames"],
                               bank=self.bank.frames[block] if self.bank is not None else [], sma=sma,
                               local=list(p["window"]) + list(own)))

    # -- the bank ---------------------------------------------------------------------------
    def update_bank(self, text_descriptor: torch.Tensor, chunk: int, switch: bool = False) -> None:
        """NAM, before a chunk's first denoising step: the policy admits the newest
        prototype and drops what is least relevant to the coming text. `switch`: this
        chunk starts a new prompt."""
        self._chunk = chunk
        self.policy.update(self, text_descriptor, switch)

    def best(self, text_descriptor: torch.Tensor | None, keep: int) -> torch.Tensor:
        """Per block, the positions [L, keep] of the bank slots most relevant to the text,
        best first. With no text (an all-zero query: every score ties) the earliest slots."""
        c, bank = self.cache, self.bank
        if text_descriptor is None:
            return c.constant(("first", keep), lambda: torch.arange(keep).expand(c.num_blocks, -1).clone())
        if self.ranker is None:
            positions = rank_slots(text_descriptor.to(c.means.device), bank.means(), keep)
            first = bank.first_slot
            self._rankings.append((self._admitted_chunk, c.slot_frames[:, first:first + bank.fill].gather(1, positions)))
            return positions
        frames = bank.frames
        kept = self.ranker.rank(self.video_id, text_descriptor.float().cpu(), frames, keep)
        return torch.tensor([[row.index(f) for f in ids] for row, ids in zip(frames, kept)], device=c.means.device)

    def admit(self, keep: torch.Tensor | None) -> None:
        """Keep the bank slots `keep` ([L, K] positions per block; None: all), then append
        the newest prototype."""
        proto = self.newest
        if not self.newest_admitted:
            if self.ranker is not None:
                self.ranker.record(self.video_id, proto.frame, proto.descriptor(), {"chunk": self._chunk})
            self._admitted.append(proto.frame)
            self._admitted_chunk = self._chunk
            self.newest_admitted = True
        if keep is not None:
            self.bank.retain(keep)
        self.bank.append(proto)
        first = self.bank.first_slot
        self._bank_trace.append((self._chunk, self.cache.slot_frames[:, first:first + self.bank.fill].clone()))

    # -- prompt switches ----------------------------------------------------------------------
    def recache(self, start: int, text_descriptor: torch.Tensor):
        """A prompt switch at latent frame `start`: yields the (first frame, frames) spans
        to recompute at the clean-context timestep under the new prompt, in order."""
        self._chunk = start // self.cfg.frames_per_chunk
        return self.policy.recache(self, start, text_descriptor)

    # -- what happened (read back from the device when asked) --------------------------------
    @property
    def trace(self) -> list[dict]:
        """Retrieval trace: bank frames per block after each update."""
        return [{"chunk": chunk, "frames": frames.tolist()} for chunk, frames in self._bank_trace]

    @property
    def sma_trace(self) -> list[dict]:
        """SMA's picks on each cache-writing pass: [frame, how many (block, head) pairs attended it]."""
        out = []
        for start, picks in self._sma_trace:
            frames, counts = picks.unique(return_counts=True)
            out.append({"start": start, "frames": [[f, n] for f, n in zip(frames.tolist(), counts.tolist())]})
        return out

    def summary(self) -> dict | None:
        """The retrieval summary so far: recorded frames, what each NAM ranking kept."""
        if self.bank is None:
            return None
        if self.ranker is not None:
            return self.ranker.summary(self.video_id)
        return {"recorded_frames": sorted(self._admitted),
                "updates": [{"chunk": chunk, "kept": kept.tolist()} for chunk, kept in self._rankings]}

    def close(self) -> dict | None:
        """Release the video's ranking state; returns the retrieval summary."""
        if self.bank is None:
            return None
        if self.ranker is not None:
            return self.ranker.release(self.video_id)
        return self.summary()

    def fork(self, stream_id: str) -> "StreamMemory":
        """An independent copy, its ranking entries under `stream_id`: every tensor copied
        in one deep copy (views, such as the newest prototype's of the prototype buffers,
        stay views of the copy), the ranking service shared and told to fork."""
        keep = {id(self.ranker): self.ranker, id(self.policy): self.policy, id(self.cfg): self.cfg}
        other = copy.deepcopy(self, memo=keep)
        other.video_id = stream_id
        if self.ranker is not None and self.bank is not None:
            self.ranker.fork(self.video_id, stream_id)
        return other

    def nbytes(self) -> int:
        """Bytes of KV held: the preallocated cache and the prototype buffers."""
        proto = sum(t.numel() * t.element_size() for t in self._proto) if self._proto else 0
        return self.cache.nbytes() + proto
