"""Comparing a candidate render of a script with its baseline render.

Measures (each flagged against its threshold): per-frame PSNR and SSIM in pixel
space, the largest latent difference, the frame count and the retrieval traces
(did the memory keep the same frames?) ask "is it the same render?"; the quality
metrics of the records (memflow.quality: CLIP score, subject and background
consistency, temporal flickering) and speed (generation FPS, seconds per chunk,
KV memory held) ask "is it worse?". A change made on purpose (`pixels=False`,
regression's --expect-change) is judged on quality and speed alone.
Deterministic renders make identical code + weights + config compare as
identical: PSNR infinite, latent difference 0, identical traces and metrics.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from memflow.quality import BACKBONE_OF, METRICS
from memflow.video import read_frames


class QualityLimits(BaseModel):
    """Largest acceptable drop (baseline - candidate) of each quality metric."""

    model_config = ConfigDict(extra="forbid")

    clip_score: float = Field(1.0, ge=0, description="CLIP score points (0-100 scale)")
    subject_consistency: float = Field(0.02, ge=0, description="VBench subject consistency (0-1)")
    background_consistency: float = Field(0.02, ge=0, description="VBench background consistency (0-1)")
    temporal_flickering: float = Field(0.01, ge=0, description="VBench temporal flickering (0-1)")


class Thresholds(BaseModel):
    """When a measure counts as a regression. Speed ratios are candidate vs baseline;
    quality drops are absolute, per script (the video's value) and for the suite mean."""

    model_config = ConfigDict(extra="forbid")

    psnr_min_db: float = Field(40.0, description="lowest acceptable per-frame PSNR")
    ssim_min: float = Field(0.98, description="lowest acceptable per-frame SSIM")
    latent_max_abs: float = Field(1e-3, description="largest acceptable |candidate - baseline| latent")
    fps_drop_max: float = Field(0.25, description="largest acceptable relative drop of generation FPS")
    chunk_seconds_increase_max: float = Field(0.25, description="largest acceptable relative rise of s/chunk")
    memory_increase_max: float = Field(0.10, description="largest acceptable relative rise of KV memory held")
    traces_must_match: bool = Field(True, description="retrieval traces (bank contents, SMA picks) must be identical")
    quality_drop_max: QualityLimits = Field(QualityLimits(), description="per script: largest drop of each metric")
    suite_quality_drop_max: QualityLimits = Field(
        QualityLimits(clip_score=0.5, subject_consistency=0.01, background_consistency=0.01, temporal_flickering=0.005),
        description="suite: largest drop of each metric's mean over the scripts")

    def flat(self) -> dict:
        """name -> value with the quality limits spelled out (for the report)."""
        out = self.model_dump(exclude={"quality_drop_max", "suite_quality_drop_max"})
        for scope in ("quality_drop_max", "suite_quality_drop_max"):
            out.update({f"{scope}.{k}": v for k, v in getattr(self, scope).model_dump().items()})
        return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


_WINDOW = _gaussian()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (torch.from_numpy(f.astype(np.float64)) @ weights for f in (a, b))
    x, y = x[None, None], y[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    pad = _WINDOW.shape[-1] // 2
    mu_x, mu_y = F.conv2d(x, _WINDOW, padding=pad), F.conv2d(y, _WINDOW, padding=pad)
    sxx = F.conv2d(x * x, _WINDOW, padding=pad) - mu_x ** 2
    syy = F.conv2d(y * y, _WINDOW, padding=pad) - mu_y ** 2
    sxy = F.conv2d(x * y, _WINDOW, padding=pad) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s[..., pad:-pad, pad:-pad].mean()) if min(a.shape[:2]) > 2 * pad else float(s.mean())


@dataclass
class VideoComparison:
    """Frames compared one by one, streamed: only the worst frames and the filmstrip's are kept."""

    frames_baseline: int = 0
    frames_candidate: int = 0
    pixels: bool = True  # False: PSNR/SSIM not computed (a change made on purpose)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    worst: list[tuple[float, int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (psnr, index, base, cand)
    strip: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)


def compare_videos(baseline, candidate, picks: Iterable[int], pixels: bool = True, worst: int = 3) -> VideoComparison:
    """baseline/candidate: mp4 paths or binary files. Keeps the frame pairs at `picks`
    (the report's filmstrip) and, when `pixels`, per-frame PSNR and SSIM and the
    `worst` lowest-PSNR pairs."""
    out = VideoComparison(pixels=pixels)
    picks = set(picks)
    heap: list = []
    base_frames, cand_frames = read_frames(baseline), read_frames(candidate)
    both = 0
    for i, (b, c) in enumerate(zip(base_frames, cand_frames)):
        both += 1
        if i in picks:
            out.strip.append((i, b, c))
        if not pixels:
            continue
        p = psnr(b, c)
        out.psnr.append(p)
        out.ssim.append(1.0 if p == math.inf else ssim(b, c))
        if p != math.inf:
            item = (-p, i, b, c)
            (heapq.heappush if len(heap) < worst else heapq.heappushpop)(heap, item)
    out.frames_baseline = both + sum(1 for _ in base_frames)  # whatever one video has beyond the other
    out.frames_candidate = both + sum(1 for _ in cand_frames)
    out.worst = sorted(((-q, i, b, c) for q, i, b, c in heap), key=lambda t: t[0])
    return out


def latent_difference(baseline: bytes | None, candidate: bytes | None) -> float | None:
    """max |a - b| of two latents files (safetensors bytes); None when either is missing."""
    if baseline is None or candidate is None:
        return None
    from safetensors.torch import load

    a, b = load(baseline)["latents"], load(candidate)["latents"]
    if a.shape != b.shape:
        return math.inf
    return float((a.float() - b.float()).abs().max())


def _ratio(candidate: float, baseline: float) -> float:
    return candidate / baseline - 1 if baseline else 0.0


def _over(excess: float, limit: float) -> float:
    """How many thresholds past acceptable a change is (> 1: flagged; < 0: better)."""
    return excess / limit if limit > 0 else math.inf if excess > 0 else 0.0


def quality_values(base: dict, cand: dict, metric: str) -> tuple[float | None, float | None, bool]:
    """The video's metric in each record and whether the two can be compared: both
    measured, with the same backbone (a CLIP score from another CLIP means nothing)."""
    bq, cq = base.get("quality") or {}, cand.get("quality") or {}
    b, c = (bq.get("video") or {}).get(metric), (cq.get("video") or {}).get(metric)
    backbone = BACKBONE_OF[metric]
    same = backbone is None or (bq.get("backbones") or {}).get(backbone) == (cq.get("backbones") or {}).get(backbone)
    return b, c, b is not None and c is not None and same


def judge(base: dict, cand: dict, video: VideoComparison, latent_diff: float | None, t: Thresholds) -> dict:
    """The measures of one script and which of them regressed; `worst_change` is the
    quality or speed change furthest past its threshold (in thresholds, > 1 flagged)."""
    bt, ct = base["timings"], cand["timings"]
    b_chunk = float(np.mean(bt["chunk_seconds"]))
    c_chunk = float(np.mean(ct["chunk_seconds"]))
    px = video.pixels
    m = {
        "frames_baseline": video.frames_baseline, "frames_candidate": video.frames_candidate,
        "psnr_min_db": min(video.psnr, default=math.inf) if px else None,
        "psnr_mean_db": float(np.mean([p for p in video.psnr if p != math.inf] or [math.inf])) if px else None,
        "identical_frames": sum(p == math.inf for p in video.psnr) if px else None,
        "ssim_min": (min(video.ssim) if video.ssim else 1.0) if px else None,
        "latent_max_abs": latent_diff,
        "fps_baseline": bt["generation_fps"], "fps_candidate": ct["generation_fps"],
        "fps_change": _ratio(ct["generation_fps"], bt["generation_fps"]),
        "chunk_s_baseline": b_chunk, "chunk_s_candidate": c_chunk, "chunk_s_change": _ratio(c_chunk, b_chunk),
        "kv_bytes_baseline": bt["peak_kv_bytes"], "kv_bytes_candidate": ct["peak_kv_bytes"],
        "kv_change": _ratio(ct["peak_kv_bytes"], bt["peak_kv_bytes"]),
        "traces_match": all(base["retrieval"].get(k) == cand["retrieval"].get(k) for k in ("bank_trace", "sma_trace")),
        "config_changed": base["model"]["fingerprint"] != cand["model"]["fingerprint"],
        # the memory policy each side rendered with (records before policies existed: the paper's)
        "fidelity_baseline": base["model"].get("fidelity", "paper"),
        "fidelity_candidate": cand["model"].get("fidelity", "paper"),
    }
    over = {"fps": _over(-m["fps_change"], t.fps_drop_max),
            "chunk_seconds": _over(m["chunk_s_change"], t.chunk_seconds_increase_max),
            "memory": _over(m["kv_change"], t.memory_increase_max)}
    for metric in METRICS:
        b, c, comparable = quality_values(base, cand, metric)
        m.update({f"{metric}_baseline": b, f"{metric}_candidate": c, f"{metric}_change": c - b if comparable else None})
        if comparable:
            over[metric] = _over(b - c, getattr(t.quality_drop_max, metric))
    flags = {k: v > 1 for k, v in over.items()}
    if px:  # "is it the same render?": skipped for a change made on purpose
        flags = {"frame_count": video.frames_baseline != video.frames_candidate,
                 "psnr": m["psnr_min_db"] < t.psnr_min_db,
                 "ssim": m["ssim_min"] < t.ssim_min,
                 "latent": latent_diff is not None and latent_diff > t.latent_max_abs,
                 "traces": t.traces_must_match and not m["traces_match"], **flags}
    m["worst_measure"], m["worst_change"] = max(over.items(), key=lambda kv: kv[1])
    m["regressed_measures"] = [k for k, v in flags.items() if v]
    m["regressed"] = bool(m["regressed_measures"])
    return m


def judge_suite(rows: list[dict], t: Thresholds) -> list[dict]:
    """Each quality metric's mean over the scripts that measured it comparably in both
    runs, baseline vs candidate; flagged when it dropped past the suite threshold."""
    out = []
    for metric in METRICS:
        pairs = [(r[f"{metric}_baseline"], r[f"{metric}_candidate"]) for r in rows
                 if r.get(f"{metric}_change") is not None]
        if not pairs:
            continue
        b, c = (float(np.mean(v)) for v in zip(*pairs))
        limit = getattr(t.suite_quality_drop_max, metric)
        out.append({"metric": metric, "scripts": len(pairs), "baseline": b, "candidate": c, "change": c - b,
                    "limit": limit, "regressed": b - c > limit})
    return out
