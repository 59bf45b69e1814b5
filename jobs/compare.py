"""Comparing a candidate render of a script with its baseline render.

Measures (each flagged against its threshold): per-frame PSNR and SSIM in pixel
space, the largest latent difference, the frame count, speed (generation FPS,
seconds per chunk, KV memory held) and the retrieval traces (did the memory keep
the same frames?). Deterministic renders make identical code + weights + config
compare as identical: PSNR infinite, latent difference 0, identical traces.
"""
from __future__ import annotations

import heapq
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from memflow.video import read_frames


class Thresholds(BaseModel):
    """When a measure counts as a regression. Speed ratios are candidate vs baseline."""

    model_config = ConfigDict(extra="forbid")

    psnr_min_db: float = Field(40.0, description="lowest acceptable per-frame PSNR")
    ssim_min: float = Field(0.98, description="lowest acceptable per-frame SSIM")
    latent_max_abs: float = Field(1e-3, description="largest acceptable |candidate - baseline| latent")
    fps_drop_max: float = Field(0.25, description="largest acceptable relative drop of generation FPS")
    chunk_seconds_increase_max: float = Field(0.25, description="largest acceptable relative rise of s/chunk")
    memory_increase_max: float = Field(0.10, description="largest acceptable relative rise of KV memory held")
    traces_must_match: bool = Field(True, description="retrieval traces (bank contents, SMA picks) must be identical")


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
    """Frames compared one by one, streamed: only the worst frames and a filmstrip are kept."""

    frames_baseline: int = 0
    frames_candidate: int = 0
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    worst: list[tuple[float, int, np.ndarray, np.ndarray]] = field(default_factory=list)  # (psnr, index, base, cand)
    strip: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)


def compare_videos(baseline, candidate, expected_frames: int, strip: int = 6, worst: int = 3) -> VideoComparison:
    """baseline/candidate: mp4 paths or binary files. Keeps `worst` lowest-PSNR frame
    pairs and `strip` evenly spaced pairs for the report."""
    out = VideoComparison()
    picks = set(np.linspace(0, max(expected_frames - 1, 0), strip).round().astype(int).tolist())
    heap: list = []
    base_frames, cand_frames = read_frames(baseline), read_frames(candidate)
    for i, (b, c) in enumerate(zip(base_frames, cand_frames)):
        p = psnr(b, c)
        out.psnr.append(p)
        out.ssim.append(1.0 if p == math.inf else ssim(b, c))
        if i in picks:
            out.strip.append((i, b, c))
        if p != math.inf:
            item = (-p, i, b, c)
            (heapq.heappush if len(heap) < worst else heapq.heappushpop)(heap, item)
    out.frames_baseline = out.frames_candidate = len(out.psnr)
    out.frames_baseline += sum(1 for _ in base_frames)  # whatever one video has beyond the other
    out.frames_candidate += sum(1 for _ in cand_frames)
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


def judge(base: dict, cand: dict, video: VideoComparison, latent_diff: float | None, t: Thresholds) -> dict:
    """The measures of one script and which of them regressed."""
    bt, ct = base["timings"], cand["timings"]
    b_chunk = float(np.mean(bt["chunk_seconds"]))
    c_chunk = float(np.mean(ct["chunk_seconds"]))
    m = {
        "frames_baseline": video.frames_baseline, "frames_candidate": video.frames_candidate,
        "psnr_min_db": min(video.psnr, default=math.inf),
        "psnr_mean_db": float(np.mean([p for p in video.psnr if p != math.inf] or [math.inf])),
        "identical_frames": sum(p == math.inf for p in video.psnr),
        "ssim_min": min(video.ssim) if video.ssim else 1.0,
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
    flags = {
        "frame_count": video.frames_baseline != video.frames_candidate,
        "psnr": m["psnr_min_db"] < t.psnr_min_db,
        "ssim": m["ssim_min"] < t.ssim_min,
        "latent": latent_diff is not None and latent_diff > t.latent_max_abs,
        "fps": -m["fps_change"] > t.fps_drop_max,
        "chunk_seconds": m["chunk_s_change"] > t.chunk_seconds_increase_max,
        "memory": m["kv_change"] > t.memory_increase_max,
        "traces": t.traces_must_match and not m["traces_match"],
    }
    m["regressed_measures"] = [k for k, v in flags.items() if v]
    m["regressed"] = bool(m["regressed_measures"])
    return m


def png(image: np.ndarray) -> bytes:
    """A uint8 RGB array as PNG bytes (matplotlib's writer: no extra dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, image, format="png")
    return buf.getvalue()

