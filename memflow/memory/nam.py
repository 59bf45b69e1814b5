"""Narrative Adaptive Memory: rank bank frames by relevance to the text of the coming chunk.

S_i = mean over heads of <mean text key, mean frame key> / sqrt(d) (memflow-algorithm.md,
section 3): rankers work on descriptors of [L, H, D] per frame, never on KV. In a single
process the ranking runs on the device (`rank_slots`, no host round trip); the `Ranker`
interface is what the Ray memory service implements, on the CPU (`InProcessRanker`).
Both order frames the same way (best first, ties to the earlier position), so they
choose identical frames.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch


def nam_scores(text: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """text [..., H, D] (mean cross-attention key of the prompt), frames [..., n, H, D]
    (mean key of each frame) -> scores [..., n]; leading dims are blocks."""
    return (frames.float() * text.float().unsqueeze(-3)).sum(-1).mean(-1) / math.sqrt(text.shape[-1])


def rank_slots(text: torch.Tensor, frames: torch.Tensor, keep: int) -> torch.Tensor:
    """The in-process ranking, on the device: per block, the positions of the `keep`
    best frames, best first, ties to the earlier position (as `select_best`).
    text [L, H, D], frames [L, n, H, D] -> [L, keep]."""
    return torch.sort(-nam_scores(text, frames), dim=-1, stable=True).indices[:, :keep]


def select_best(ids: list[int], scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` best ids by score, best first; ties go to the earlier position in `ids`
    (the same on every device: the order is decided here, on the CPU, not by a top-k kernel)."""
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), i))[:keep]
    return [ids[i] for i in order]


class Ranker(Protocol):
    def record(self, video: str, frame: int, descriptor: torch.Tensor, meta: dict | None = None) -> None:
        """Remember a prototype's descriptor [L, H, D] for `video`."""

    def rank(self, video: str, text: torch.Tensor, candidates: list[list[int]], keep: int) -> list[list[int]]:
        """Per block l: the `keep` best of candidates[l] against text[l] ([L, H, D]), as
        `select_best` orders them (best first). Candidates may repeat an id."""

    def release(self, video: str) -> dict | None:
        """Forget everything about `video`; return its retrieval summary."""

    def summary(self, video: str) -> dict | None:
        """The retrieval summary of `video` so far (it goes on)."""

    def fork(self, video: str, into: str) -> None:
        """`into` starts as a copy of everything known about `video` (a story that branches)."""


class InProcessRanker:
    """The single-process ranker: descriptors in a dict, scored on the CPU. It keeps
    every recorded prototype and a retrieval trace (what each update kept) per video."""

    def __init__(self):
        self.videos: dict[str, dict] = {}

    def record(self, video, frame, descriptor, meta=None):
        state = self.videos.setdefault(video, {"frames": {}, "meta": {}, "trace": []})
        state["frames"][frame] = descriptor.float().cpu()
        state["meta"][frame] = meta or {}

    def rank(self, video, text, candidates, keep):
        state = self.videos[video]
        frames = state["frames"]
        kept = [select_best(ids, nam_scores(text[l], torch.stack([frames[i][l] for i in ids])), keep)
                for l, ids in enumerate(candidates)]
        newest = state["meta"][max(frames)] if frames else {}
        state["trace"].append({"chunk": newest.get("chunk"), "kept": kept})
        return kept

    def release(self, video):
        summary = self.summary(video)
        self.videos.pop(video, None)
        return summary

    def summary(self, video):
        state = self.videos.get(video)
        if state is None:
            return None
        return {"recorded_frames": sorted(state["frames"]), "updates": list(state["trace"])}

    def export(self, video) -> dict | None:
        """Everything known about `video`, as plain values (descriptors are never written in place)."""
        state = self.videos.get(video)
        return None if state is None else {k: type(v)(v) for k, v in state.items()}

    def adopt(self, video, state: dict) -> None:
        self.videos[video] = {k: type(v)(v) for k, v in state.items()}

    def fork(self, video, into):
        state = self.export(video)
        if state is not None:
            self.adopt(into, state)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.videos.values() for t in v["frames"].values())
