"""The regression report: an HTML page people can look at, images beside it.

Suite: the verdict and what it judged, the suite means of the quality metrics, a
table of scripts sortable by any column (by the worst change first; `#sort=KEY`
or `#sort=-KEY` in the URL picks another order), PSNR over time and FPS per script.
Per script: the memory timeline (what the bank held and SMA attended at each
chunk, prompt switches marked; baseline above candidate), the filmstrip with each
segment's prompt under its frames, per-segment quality bars baseline vs
candidate, the table of measures and difference heatmaps of the worst frames.
The page is rendered from templates/report.html.j2 (with report.css and report.js
inlined, so it is one file); images are PNGs written with matplotlib; the page only
references files next to it, so it opens from object storage, a laptop or a CI artifact alike.
"""
from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jinja2

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from cluster.storage import Storage  # noqa: E402
from memflow.quality import METRICS, SWITCH_METRICS  # noqa: E402

from .compare import Thresholds, VideoComparison  # noqa: E402

PSNR_CAP_DB = 100.0  # identical frames (infinite PSNR) are drawn here
BASELINE, CANDIDATE, DROPPED = "#9aa3ad", "#2b7bb9", "#d33"
STRIP_FRAMES = 12  # filmstrip frames per script, spread over its segments (1 to 3 each)
LABELS = {"clip_score": "CLIP score", "subject_consistency": "subject consistency",
          "background_consistency": "background consistency", "temporal_flickering": "temporal flickering"}


def _save(fig, storage: Storage, rel: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(f"report/{rel}", buf.getvalue())
    return rel


def filmstrip_picks(record: dict) -> dict[int, list[int]]:
    """Frames to show per segment: evenly inside it, STRIP_FRAMES in all (1 to 3 a segment)."""
    segments = record["segments"]
    k = max(1, min(3, STRIP_FRAMES // len(segments)))
    return {s["index"]: sorted({int(round(f)) for f in np.linspace(s["start_frame"], s["end_frame"] - 1, k + 2)[1:-1]})
            for s in segments}


# -- memory timeline --------------------------------------------------------------------
def memory_timeline(record: dict) -> tuple[int, dict[int, dict], dict[int, dict]]:
    """(frames per chunk, bank, sma): for each chunk, the memory frames (latent frame
    numbers) the bank held, as the share of blocks holding each, and the frames SMA
    attended on the chunk's cache-writing pass, as the share of all (block, head) picks.
    Re-cache passes at a prompt switch revisit earlier frames and are left out."""
    fpc = max(1, record["segments"][-1]["latent_end"] // record["num_chunks"])
    trace = sorted(record["retrieval"].get("bank_trace") or [], key=lambda e: e["chunk"])
    bank, held, j = {}, {}, 0
    for chunk in range(record["num_chunks"]):
        while j < len(trace) and trace[j]["chunk"] <= chunk:
            blocks = trace[j]["frames"]
            held = {f: n / len(blocks) for f, n in Counter(f for b in blocks for f in b).items()}
            j += 1
        bank[chunk] = held
    sma, newest = {}, -1
    for entry in record["retrieval"].get("sma_trace") or []:
        if entry["start"] > newest:
            newest = entry["start"]
            total = sum(n for _, n in entry["frames"]) or 1
            sma[entry["start"] // fpc] = {f: n / total for f, n in entry["frames"]}
    return fpc, bank, sma


def _timeline_axis(ax, record: dict, title: str) -> None:
    fpc, bank, sma = memory_timeline(record)
    chunks = record["num_chunks"]
    for c in range(chunks):  # the chunk being generated, for reference
        ax.add_patch(plt.Rectangle((c - 0.45, c * fpc - 0.5), 0.9, fpc, color="#e8e8e8", zorder=0, linewidth=0))
    pts = [(c + (-0.18 if sma.get(c) else 0), f, share) for c, frames in bank.items() for f, share in frames.items()]
    if pts:
        x, y, share = zip(*pts)
        ax.scatter(x, y, c=share, cmap="Blues", vmin=0, vmax=1, marker="s", s=26, edgecolors="#246",
                   linewidths=0.4, label="bank (shade: share of blocks)", zorder=2)
    pts = [(c + 0.18, f, share) for c, frames in sma.items() for f, share in frames.items()]
    if pts:
        x, y, share = zip(*pts)
        ax.scatter(x, y, s=[12 + 160 * s for s in share], color="#e8701a", alpha=0.85,
                   label="SMA attended (size: share of picks)", zorder=3)
    top = max(chunks * fpc, 1)
    for s in record["segments"][1:]:
        x = s["latent_start"] // fpc - 0.5
        ax.axvline(x, color="#c22", linestyle="--", linewidth=1, zorder=1)
    for s in record["segments"]:
        ax.text(s["latent_start"] // fpc - 0.4, top + 0.5, f"seg {s['index']}", fontsize=7, color="#c22", va="bottom")
    ax.set_xlim(-0.6, chunks - 0.4)
    ax.set_ylim(-1, top + 3)
    ax.set_ylabel("memory frame\n(latent index)", fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    if not bank or not any(bank.values()):
        ax.text(0.5, 0.5, f"no memory bank (memory {record['model']['memory']})", transform=ax.transAxes,
                ha="center", fontsize=8, color="#666")


def timeline_plot(storage: Storage, video_id: str, base: dict, cand: dict) -> str:
    width = min(14.0, max(7.5, 0.22 * max(base["num_chunks"], cand["num_chunks"])))
    fig, axes = plt.subplots(2, 1, figsize=(width, 5.4), sharex=True, sharey=True)
    _timeline_axis(axes[0], base, f"baseline (memory {base['model']['memory']})")
    _timeline_axis(axes[1], cand, f"candidate (memory {cand['model']['memory']})")
    axes[1].set_xlabel("chunk (grey: the frames it generates; red dashes: prompt switches)", fontsize=8)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="upper right", fontsize=7, ncol=2, frameon=False)
    return _save(fig, storage, f"img/{video_id}-memory.png")


# -- filmstrip and per-segment metrics ----------------------------------------------------
def segment_strips(storage: Storage, video_id: str, cmp: VideoComparison, picks: dict[int, list[int]]) -> dict[int, str]:
    """One small image per segment: its picked frames, baseline above candidate."""
    frames = {i: (b, c) for i, b, c in cmp.strip}
    out = {}
    for seg, indices in picks.items():
        indices = [i for i in indices if i in frames]
        if not indices:
            continue
        fig, axes = plt.subplots(2, len(indices), figsize=(1.45 * len(indices), 3.0), squeeze=False)
        for col, i in enumerate(indices):
            for row, label in enumerate(("baseline", "candidate")):
                ax = axes[row][col]
                ax.imshow(frames[i][row])
                ax.set_xticks([]), ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(label, fontsize=7)
            axes[0][col].set_title(f"#{i}", fontsize=7)
        fig.subplots_adjust(wspace=0.04, hspace=0.04)
        out[seg] = _save(fig, storage, f"img/{video_id}-seg{seg}.png")
    return out


def _groups(record: dict, metric: str) -> dict[str, float]:
    q = record.get("quality") or {}
    values = {f"seg {s['index']}": s.get(metric) for s in q.get("segments", [])}
    if metric in SWITCH_METRICS:
        values.update({f"{w['from_segment']}→{w['to_segment']}": w.get(metric) for w in q.get("switches", [])})
    return values


def quality_bars(storage: Storage, video_id: str, base: dict, cand: dict, thresholds: Thresholds) -> str | None:
    """Per metric: segments (and windows across switches) side by side, baseline vs
    candidate; a candidate bar is red where it dropped past the per-script threshold."""
    metrics = [m for m in METRICS if any(v is not None for r in (base, cand) for v in _groups(r, m).values())]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        b, c = _groups(base, metric), _groups(cand, metric)
        names = list(dict.fromkeys([*b, *c]))
        bv = np.array([np.nan if b.get(n) is None else b[n] for n in names])
        cv = np.array([np.nan if c.get(n) is None else c[n] for n in names])
        limit = getattr(thresholds.quality_drop_max, metric)
        x = np.arange(len(names))
        ax.bar(x - 0.2, bv, 0.4, color=BASELINE)
        ax.bar(x + 0.2, cv, 0.4, color=[DROPPED if d > limit else CANDIDATE for d in np.nan_to_num(bv - cv)])
        values = np.concatenate([bv, cv])
        values = values[~np.isnan(values)]
        if values.size:  # zoomed: the differences that matter are small against the values
            lo, hi = values.min(), values.max()
            pad = max((hi - lo) * 0.35, abs(hi) * 0.01, 1e-3)
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
        ax.set_xticks(x, names, fontsize=7, rotation=30 if len(names) > 4 else 0)
        ax.set_title(LABELS[metric], fontsize=9)
        ax.tick_params(labelsize=7)
    fig.legend([Patch(color=c) for c in (BASELINE, CANDIDATE, DROPPED)],
               ["baseline", "candidate", "candidate, dropped past the threshold"],
               loc="upper right", fontsize=7, ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, storage, f"img/{video_id}-quality.png")


def worst_frames(storage: Storage, video_id: str, cmp: VideoComparison) -> list[str]:
    """Difference heatmaps of the lowest-PSNR frames (pixel comparisons only)."""
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
    return heatmaps


def script_images(storage: Storage, video_id: str, cmp: VideoComparison, base: dict, cand: dict,
                  thresholds: Thresholds) -> dict:
    """All images of one script; returns their relative paths (and the segments they belong to)."""
    return {"timeline": timeline_plot(storage, video_id, base, cand),
            "strips": segment_strips(storage, video_id, cmp, filmstrip_picks(cand)),
            "segments": cand["segments"],
            "bars": quality_bars(storage, video_id, base, cand, thresholds),
            "heatmaps": worst_frames(storage, video_id, cmp)}


def suite_plots(storage: Storage, psnr_series: dict[str, list[float]], rows: list[dict]) -> dict:
    plots = {}
    if psnr_series:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        for vid, series in psnr_series.items():
            ax.plot([min(p, PSNR_CAP_DB) for p in series], label=vid, linewidth=1)
        ax.set_xlabel("frame")
        ax.set_ylabel(f"PSNR dB (identical = {PSNR_CAP_DB:.0f})")
        ax.set_title("PSNR over time, candidate vs baseline")
        ax.legend(fontsize=7, loc="lower left")
        plots["psnr"] = _save(fig, storage, "psnr.png")

    fig, ax = plt.subplots(figsize=(8, 3.2))
    ids = [r["id"] for r in rows]
    x = np.arange(len(ids))
    ax.bar(x - 0.2, [r.get("fps_baseline") or 0 for r in rows], 0.4, label="baseline", color=BASELINE)
    ax.bar(x + 0.2, [r.get("fps_candidate") or 0 for r in rows], 0.4, label="candidate", color=CANDIDATE)
    ax.set_xticks(x, ids, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("generation FPS")
    ax.set_title("FPS per script")
    ax.legend(fontsize=7)
    plots["fps"] = _save(fig, storage, "fps.png")
    return plots


# -- the page -------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.4g}"
    return str(value)


def _signed(value, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.1f}%" if percent else f"{value:+.4g}"


def _sort_key(value) -> str:
    """A cell's data-v: numbers sort as numbers, missing values last in either direction."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)):  # JavaScript's parseFloat reads "Infinity", not Python's "inf"
        return "Infinity" if value == math.inf else "-Infinity" if value == -math.inf else repr(float(value))
    return str(value).lower()


MEASURES = [("frames_baseline", "frames (baseline)", "frame_count"), ("frames_candidate", "frames (candidate)", "frame_count"),
            ("identical_frames", "identical frames", None), ("psnr_min_db", "min PSNR dB", "psnr"),
            ("psnr_mean_db", "mean PSNR dB (differing frames)", "psnr"),
            ("ssim_min", "min SSIM", "ssim"), ("latent_max_abs", "max |Δ latent|", "latent"),
            *[(f"{m}_{side}", f"{LABELS[m]} ({side})", m) for m in METRICS for side in ("baseline", "candidate")],
            ("fps_baseline", "FPS (baseline)", "fps"), ("fps_candidate", "FPS (candidate)", "fps"),
            ("chunk_s_baseline", "s/chunk (baseline)", "chunk_seconds"),
            ("chunk_s_candidate", "s/chunk (candidate)", "chunk_seconds"),
            ("kv_bytes_baseline", "KV bytes (baseline)", "memory"), ("kv_bytes_candidate", "KV bytes (candidate)", "memory"),
            ("traces_match", "retrieval traces identical", "traces"), ("config_changed", "config changed", None),
            ("fidelity_baseline", "memory policy (baseline)", None), ("fidelity_candidate", "memory policy (candidate)", None)]


def _worst(row: dict) -> float | None:
    """A script that did not render is the worst change of all."""
    return math.inf if row["status"] == "not rendered" else row.get("worst_change")


@dataclass(frozen=True)
class Cell:
    text: str
    sort: str
    cls: str = ""
    link: str | None = None  # the script's section
    note: str | None = None  # small print after the text


# The suite table: (key, header, cell text, sort value, measure whose flag colours the cell)
COLUMNS = [("id", "script", lambda r: r["id"], lambda r: r["id"], None),
           ("status", "verdict", lambda r: r["status"], lambda r: r["status"], None),
           ("worst_change", "worst change ×threshold", lambda r: _fmt(r.get("worst_change")), _worst, None),
           *[(f"{m}_change", f"Δ {LABELS[m]}", lambda r, m=m: _signed(r.get(f"{m}_change")),
              lambda r, m=m: r.get(f"{m}_change"), m) for m in METRICS],
           ("fps_change", "FPS change", lambda r: _signed(r.get("fps_change"), percent=True),
            lambda r: r.get("fps_change"), "fps"),
           ("regressed_measures", "regressed measures", lambda r: ", ".join(r.get("regressed_measures", [])),
            lambda r: len(r.get("regressed_measures", [])), None)]


def _suite_table(rows: list[dict]) -> list[list[Cell]]:
    """Sorted by the worst change (in the page too, so it reads right without scripts)."""
    ordered = sorted(rows, key=lambda r: -math.inf if _worst(r) is None else _worst(r), reverse=True)
    table = []
    for r in ordered:
        cells = []
        for key, _, show, sort, measure in COLUMNS:
            flagged = (measure in r.get("regressed_measures", [])) or (key == "status" and r.get("regressed"))
            cells.append(Cell(show(r), _sort_key(sort(r)), "bad" if flagged else "ok" if key == "status" else "",
                              link=r["id"] if key == "id" else None,
                              note=r.get("worst_measure") or "" if key == "worst_change" else None))
        table.append(cells)
    return table


_TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                                autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True,
                                lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def write_html(storage: Storage, title: str, verdict: str, rows: list[dict], images: dict[str, dict],
               plots: dict, suite: list[dict], thresholds: dict) -> str:
    """Render templates/report.html.j2 to report/index.html; returns its key."""
    state = "failed" if verdict.startswith("run failed") else "regressed" if "REGRESSION" in verdict else "clean"
    suite_quality = [{"label": LABELS[q["metric"]], "scripts": q["scripts"], "baseline": _fmt(q["baseline"]),
                      "candidate": _fmt(q["candidate"]), "change": _signed(q["change"]), "limit": _fmt(q["limit"]),
                      "regressed": q["regressed"]} for q in suite]
    scripts = [{"id": r["id"], "status": r["status"],
                "images": {"timeline": None, "strips": {}, "segments": [], "bars": None, "heatmaps": [],
                           **images.get(r["id"], {})},
                "measures": [(label, _fmt(r.get(key)), flag in r.get("regressed_measures", []))
                             for key, label, flag in MEASURES] if "frames_candidate" in r else []}
               for r in rows]
    page = _TEMPLATES.get_template("report.html.j2").render(
        title=title, verdict=verdict, state=state, suite_quality=suite_quality,
        columns=[(key, header) for key, header, *_ in COLUMNS], table=_suite_table(rows), plots=plots,
        scripts=scripts, thresholds=[(k, _fmt(v)) for k, v in thresholds.items()])
    storage.write_text("report/index.html", page)
    return "report/index.html"
