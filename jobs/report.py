"""The regression report: an HTML page people can look at, images beside it.

Per script: a table of measures (regressed ones highlighted), a filmstrip of
baseline vs candidate thumbnails, and difference heatmaps of the worst frames.
For the suite: PSNR over time and FPS per script. Images are PNGs written with
matplotlib; the page only references files next to it, so it opens from object
storage, a laptop or a CI artifact alike.
"""
from __future__ import annotations

import html
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cluster.storage import Storage  # noqa: E402

from .compare import VideoComparison  # noqa: E402

PSNR_CAP_DB = 100.0  # identical frames (infinite PSNR) are drawn here


def _save(fig, storage: Storage, rel: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(f"report/{rel}", buf.getvalue())
    return rel


def script_images(storage: Storage, video_id: str, cmp: VideoComparison) -> dict:
    """Filmstrip and worst-frame heatmaps of one script; returns their relative paths."""
    strip = []
    if cmp.strip:
        fig, axes = plt.subplots(2, len(cmp.strip), figsize=(1.8 * len(cmp.strip), 3.8), squeeze=False)
        for col, (index, base, cand) in enumerate(cmp.strip):
            for row, (frame, label) in enumerate(((base, "baseline"), (cand, "candidate"))):
                ax = axes[row][col]
                ax.imshow(frame)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(f"{label} #{index}", fontsize=7)
        strip.append(_save(fig, storage, f"img/{video_id}-strip.png"))
    heatmaps = []
    for p, index, base, cand in cmp.worst:
        diff = np.abs(base.astype(np.int16) - cand.astype(np.int16)).mean(-1)
        fig, axes = plt.subplots(1, 3, figsize=(8, 2.6))
        for ax, img, title in ((axes[0], base, "baseline"), (axes[1], cand, "candidate")):
            ax.imshow(img)
            ax.set_title(f"{title} #{index}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        im = axes[2].imshow(diff, cmap="inferno", vmin=0)
        axes[2].set_title(f"|difference|, PSNR {p:.1f} dB", fontsize=8)
        axes[2].set_xticks([]), axes[2].set_yticks([])
        fig.colorbar(im, ax=axes[2], fraction=0.046)
        heatmaps.append(_save(fig, storage, f"img/{video_id}-diff-{index}.png"))
    return {"strip": strip, "heatmaps": heatmaps}


def suite_plots(storage: Storage, psnr_series: dict[str, list[float]], rows: list[dict]) -> dict:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for vid, series in psnr_series.items():
        ax.plot([min(p, PSNR_CAP_DB) for p in series], label=vid, linewidth=1)
    ax.set_xlabel("frame")
    ax.set_ylabel(f"PSNR dB (identical = {PSNR_CAP_DB:.0f})")
    ax.set_title("PSNR over time, candidate vs baseline")
    if psnr_series:
        ax.legend(fontsize=7, loc="lower left")
    psnr_png = _save(fig, storage, "psnr.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ids = [r["id"] for r in rows]
    x = np.arange(len(ids))
    ax.bar(x - 0.2, [r.get("fps_baseline") or 0 for r in rows], 0.4, label="baseline")
    ax.bar(x + 0.2, [r.get("fps_candidate") or 0 for r in rows], 0.4, label="candidate")
    ax.set_xticks(x, ids, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("generation FPS")
    ax.set_title("FPS per script")
    ax.legend(fontsize=7)
    fps_png = _save(fig, storage, "fps.png")
    return {"psnr": psnr_png, "fps": fps_png}


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return html.escape(str(value))


MEASURES = [("frames_baseline", "frames (baseline)", "frame_count"), ("frames_candidate", "frames (candidate)", "frame_count"),
            ("identical_frames", "identical frames", None), ("psnr_min_db", "min PSNR dB", "psnr"),
            ("psnr_mean_db", "mean PSNR dB (differing frames)", "psnr"),
            ("ssim_min", "min SSIM", "ssim"), ("latent_max_abs", "max |Δ latent|", "latent"),
            ("fps_baseline", "FPS (baseline)", "fps"), ("fps_candidate", "FPS (candidate)", "fps"),
            ("chunk_s_baseline", "s/chunk (baseline)", "chunk_seconds"),
            ("chunk_s_candidate", "s/chunk (candidate)", "chunk_seconds"),
            ("kv_bytes_baseline", "KV bytes (baseline)", "memory"), ("kv_bytes_candidate", "KV bytes (candidate)", "memory"),
            ("traces_match", "retrieval traces identical", "traces"), ("config_changed", "config changed", None),
            ("fidelity_baseline", "memory policy (baseline)", None), ("fidelity_candidate", "memory policy (candidate)", None)]


def write_html(storage: Storage, title: str, verdict: str, rows: list[dict], images: dict[str, dict],
               plots: dict, thresholds: dict) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"
             ".bad{background:#fdd;font-weight:bold}.ok{color:#270}.verdict{font-size:1.3em}"
             "img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='verdict'>{html.escape(verdict)}</p>",
             "<h2>Suite</h2><table><tr><th>script</th><th>verdict</th><th>regressed measures</th></tr>"]
    for r in rows:
        bad = r.get("regressed")
        parts.append(f"<tr><td><a href='#{html.escape(r['id'])}'>{html.escape(r['id'])}</a></td>"
                     f"<td class='{'bad' if bad else 'ok'}'>{html.escape(r['status'])}</td>"
                     f"<td>{html.escape(', '.join(r.get('regressed_measures', [])))}</td></tr>")
    parts.append("</table>")
    parts.append(f"<img src='{plots['psnr']}' alt='PSNR over time'><img src='{plots['fps']}' alt='FPS per script'>")
    for r in rows:
        parts.append(f"<h2 id='{html.escape(r['id'])}'>{html.escape(r['id'])}: {html.escape(r['status'])}</h2>")
        if "psnr_min_db" in r:
            parts.append("<table><tr><th>measure</th><th>value</th></tr>")
            for key, label, flag in MEASURES:
                cls = " class='bad'" if flag in r.get("regressed_measures", []) else ""
                parts.append(f"<tr><td>{label}</td><td{cls}>{_fmt(r.get(key))}</td></tr>")
            parts.append("</table>")
        for src in images.get(r["id"], {}).get("strip", []):
            parts.append(f"<img src='{src}' alt='filmstrip baseline vs candidate'>")
        for src in images.get(r["id"], {}).get("heatmaps", []):
            parts.append(f"<img src='{src}' alt='difference heatmap'>")
    parts.append("<h2>Thresholds</h2><table>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in thresholds.items()) + "</table>")
    parts.append("</body></html>")
    storage.write_text("report/index.html", "\n".join(parts))
    return "report/index.html"
