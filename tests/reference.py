"""A full recompute of a streamed video, for equivalence tests.

Every forward pass the generator made (denoising steps, clean-context passes,
re-cache passes) becomes one group of tokens in a single dense forward. Each
group's queries attend to their own tokens and to the groups/frames that the
attention pattern allows, written as an additive bias: 0 for a key seen once,
log(m) for a key the streaming code attends m times (a bank frame that the window
also holds, copies of a frame in the bank), -inf otherwise. Window and sink
membership are derived here from the rules of memflow-algorithm.md (sections 2 and 7)
for each memory policy, written out independently of memflow/memory; the memory
bank's contents and SMA's choices are taken from the streaming run's debug log (they
are checked against brute force and planted rankings in their own tests). No caches,
no StreamMemory: if the two agree, the caches hold exactly the keys/values the
pattern says.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memflow.rope import apply_rope, rope_tables


@dataclass
class Pass:
    index: int
    start: int
    x: torch.Tensor  # [1, C, F, h, w]
    timestep: float
    write: bool
    text: object  # TextContext
    out: torch.Tensor | None = None


@dataclass
class Sources:
    """What one pass attends besides the bank: sink frames from earlier passes
    ((frame, group) pairs), how many of its own first frames form the sink part, its
    own frames attended as local from `own_from` on, and window frames {frame: group}."""

    sink: list
    own_sink: int
    own_from: int
    window: dict


def _sources(passes: list[Pass], cfg) -> tuple[list[Sources], dict]:
    """Per pass its Sources under cfg.fidelity, and for each frame the group of its
    first clean pass (where prototypes come from)."""
    S, fpc = cfg.sink_size, cfg.frames_per_chunk
    local_cap = cfg.local_attn_size - S  # past window + own chunk
    latest: dict[int, int] = {}  # frame -> group whose kept KV of it is the newest
    sink_src: dict[int, int] = {}  # frame -> group whose KV of it the sink holds
    original: dict[int, int] = {}
    written_end, floor, prev_recache = 0, 0, False
    out = []
    for g, p in enumerate(passes):
        n = p.x.shape[2]
        end = p.start + n
        recache = p.write and p.start < written_end  # rewriting known frames after a switch
        if cfg.fidelity == "reference":
            # the sink is always its own part; a pass covering it (unless a re-cache that
            # starts later, which protects it) attends and writes its own sink frames
            owns = p.start < S and (p.start == 0 or not recache)
            own_sink = min(S, end) - p.start if owns else 0
            sink = [(f, sink_src[f]) for f in range(min(p.start, S) if owns else S) if f in sink_src]
            own_from = max(own_sink, n - local_cap)  # the local part keeps the last local_cap frames
            lo = max(S, end - local_cap)
            window = {f: latest[f] for f in range(lo, p.start) if f in latest}
            kept = range(p.start + own_from, end)
            sink_written = range(p.start, p.start + own_sink)
        else:  # paper: the sink is part of the window while recent; re-cache chunk by chunk
            if recache and not prev_recache:
                floor = p.start  # the window was cleared: it refills from here
            lo = max(floor, p.start - (local_cap - fpc))
            window = {f: latest[f] for f in range(lo, p.start) if f in latest}
            cutoff = min(window) if window else p.start
            sink = [(f, sink_src[f]) for f in range(min(S, cutoff)) if f in sink_src]
            own_sink, own_from = 0, 0
            kept = range(p.start, end)
            sink_written = [f for f in range(p.start, min(S, end)) if f not in sink_src]  # written once
        prev_recache = recache
        out.append(Sources(sink, own_sink, own_from, window))
        if p.write:
            for f in kept:
                latest[f] = g
            for f in sink_written:
                sink_src[f] = g
            for f in range(p.start, end):
                original.setdefault(f, g)
            written_end = max(written_end, end)
    return out, original


def reference_outputs(model, passes: list[Pass], debug: list[dict], memory_cfg) -> list[torch.Tensor]:
    T = None
    groups = []
    for p in passes:
        _, _, f, h, w = p.x.shape
        T = (h // 2) * (w // 2)
        groups.append((f, h, w))
    sizes = [f * T for f, _, _ in groups]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    N = offsets[-1]
    heads, L = model.config.num_attention_heads, len(model.blocks)
    sources, original = _sources(passes, memory_cfg)
    log = {(d["index"], d["block"]): d for d in debug}

    def frame_cols(group: int, frame: int) -> slice:
        p = passes[group]
        a = offsets[group] + (frame - p.start) * T
        return slice(a, a + T)

    # bias per block [H, N, N]
    counts = torch.zeros(L, heads, N, N)
    for g, p in enumerate(passes):
        rows = slice(offsets[g], offsets[g + 1])
        src = sources[g]
        counts[:, :, rows, offsets[g] + src.own_from * T:offsets[g + 1]] += 1
        for f, w in src.window.items():
            counts[:, :, rows, frame_cols(w, f)] += 1
        sink = src.sink + [(p.start + i, g) for i in range(src.own_sink)]
        for l in range(L):
            entry = log.get((g, l))
            memory = list(sink)
            if entry is not None:
                assert entry["sink_frames"] == len(sink), (g, l, entry["sink_frames"], sink)
                memory += [(f, original[f]) for f in entry["bank"]]
            else:
                assert not sink, (g, l, sink)
            for h in range(heads):
                chosen = range(len(memory)) if entry is None or entry["sma"] is None else entry["sma"][0, h].tolist()
                for i in chosen:
                    f, w = memory[i]
                    counts[l, h, rows, frame_cols(w, f)] += 1
    bias = torch.where(counts > 0, counts.clamp(min=1).log(), torch.tensor(-math.inf))

    # the dense forward
    with torch.no_grad():
        xs, coss, sins, ts = [], [], [], []
        for p, (f, h, w) in zip(passes, groups):
            xs.append(model.patch_embedding(p.x.to(model.dtype)).flatten(2).transpose(1, 2))
            c, s = rope_tables(model.config.attention_head_dim, p.start, f, h // 2, w // 2)
            coss.append(c), sins.append(s)
            ts.append(torch.full((f * T,), float(p.timestep)))
        x = torch.cat(xs, 1)
        cos, sin = torch.cat(coss, 1), torch.cat(sins, 1)
        t = torch.cat(ts)
        ce = model.condition_embedder
        temb = ce.time_embedder(ce.timesteps_proj(t)).to(model.dtype)  # per token [N, D]
        proj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))[None]  # [1, N, 6, D]
        for l, block in enumerate(model.blocks):
            shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table[None] + proj.float()).unbind(2)
            a1 = block.attn1
            hdn = block.norm1(x.float()) * (1 + scale) + shift
            q = apply_rope(a1.norm_q(a1.to_q(hdn)).unflatten(2, (heads, -1)), cos, sin).transpose(1, 2)
            k = apply_rope(a1.norm_k(a1.to_k(hdn)).unflatten(2, (heads, -1)), cos, sin).transpose(1, 2)
            v = a1.to_v(hdn).unflatten(2, (heads, -1)).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[l][None])
            x = x.float() + a1.to_out[0](o.transpose(1, 2).flatten(2)) * gate
            hdn = block.norm2(x)
            a2 = block.attn2
            outs = []
            for g, p in enumerate(passes):
                qg = a2.norm_q(a2.to_q(hdn[:, offsets[g]:offsets[g + 1]])).unflatten(2, (heads, -1)).transpose(1, 2)
                og = F.scaled_dot_product_attention(qg, p.text.k[l], p.text.v[l])
                outs.append(a2.to_out[0](og.transpose(1, 2).flatten(2)))
            x = x + torch.cat(outs, 1)
            hdn = block.norm3(x) * (1 + c_scale) + c_shift
            x = x + block.ffn(hdn).float() * c_gate
        shift, scale = (model.scale_shift_table[None] + temb[None, :, None].float()).unbind(2)
        y = model.proj_out(model.norm_out(x) * (1 + scale) + shift)
        results = []
        for g, (f, h, w) in enumerate(groups):
            yg = y[:, offsets[g]:offsets[g + 1]].reshape(1, f, h // 2, w // 2, 1, 2, 2, -1)
            results.append(yg.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3))
        return results
