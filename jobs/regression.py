"""Nightly regression renders: did a change to the model, the weights or the code make
videos different, worse or slower?

    ray job submit --working-dir . -- python jobs/regression.py --suite URL --baseline URL --output URL \
        [--model URL] [--clip-model URL] [--dino-model URL] [--expect-change]
    python jobs/regression.py      # local, tiny preset, bundled suite; creates the baseline on first run

The suite's scripts (fixed seeds) are rendered through the batch machinery into
<output>/render/ (a batch output, latents and quality metrics included), then each
video is compared with the baseline render of the same script (jobs/compare.py) and
flagged when a measure crosses its threshold; the suite means of the quality
metrics are judged too. `--expect-change` (a new model or policy: every pixel is
meant to move) skips the pixel comparisons and judges quality and speed only; the
verdict says which. Written to <output>: report/index.html (+ images),
comparison.json and comparison.parquet. `--promote` makes this render the new
baseline. Exit status: 0 no regression, 1 regression found, 2 the run itself failed.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator  # noqa: E402

from cluster.dataset import DatasetIndex  # noqa: E402
from cluster.replica import latents_path, record_path, video_path  # noqa: E402
from cluster.storage import Storage, storage_options  # noqa: E402
from jobs import batch  # noqa: E402
from jobs.compare import Thresholds, compare_videos, judge, judge_suite, latent_difference  # noqa: E402
from jobs.report import filmstrip_picks, script_images, suite_plots, write_html  # noqa: E402
from jobs.settings import BatchSettings, RegressionSettings  # noqa: E402
from memflow.config import FIDELITIES, MEMORY_MODES  # noqa: E402
from memflow.script import ScriptError, parse_script  # noqa: E402
from memflow.settings import Resolved  # noqa: E402

EXIT_CLEAN, EXIT_REGRESSED, EXIT_FAILED = 0, 1, 2


class Suite(BaseModel):
    """Scripts with fixed seeds, and the thresholds they are judged by."""

    model_config = ConfigDict(extra="forbid")

    name: str = "regression"
    scripts: list[dict]
    memory: Optional[str] = None  # memory mode and policy the suite renders with (flags override)
    fidelity: Optional[str] = None
    thresholds: Thresholds = Thresholds()

    @model_validator(mode="after")
    def _seeds_fixed(self):
        if not self.scripts:
            raise ValueError("scripts: a suite needs at least one script")
        if self.memory not in (None, *MEMORY_MODES):
            raise ValueError(f"memory: one of {MEMORY_MODES}, got {self.memory!r}")
        if self.fidelity not in (None, *FIDELITIES):
            raise ValueError(f"fidelity: one of {FIDELITIES}, got {self.fidelity!r}")
        for i, s in enumerate(self.scripts):
            if not isinstance(s, dict) or ("seed" not in s and "continues" not in s):
                raise ValueError(f"scripts.{i}.seed: every suite script needs a fixed seed (a continuation takes "
                                 "its parent's)")
        return self


def load_suite(url: str, endpoint_url: str | None) -> tuple[Suite, list]:
    with fsspec.open(url, "r", **storage_options(url, endpoint_url)) as f:
        data = json.load(f)
    suite = Suite.model_validate(data)
    scripts = []
    for i, raw in enumerate(suite.scripts):
        try:
            scripts.append(parse_script(raw))
        except ScriptError as e:
            raise ScriptError(f"scripts.{i}: {e}") from None
    return suite, scripts


# A batch output's folders of files besides records/ (the commit markers); its dataset
# tables (manifest/, metrics/) are an index of the records, rebuilt from them.
PAYLOAD_FOLDERS = ("videos", "latents")
TABLES = tuple(DatasetIndex.TABLES)


def copy_render(src: Storage, dst: Storage) -> None:
    """Make dst a copy of the batch output src: payloads first, records (commit
    markers) after them, then drop what src does not have, then its dataset tables
    anew from the records."""
    for folder in (*PAYLOAD_FOLDERS, "records"):
        names = src.list(folder)
        for name in names:
            dst.write_bytes(f"{folder}/{name}", src.read_bytes(f"{folder}/{name}"))
        for stale in set(dst.list(folder)) - set(names):
            dst.delete(f"{folder}/{stale}")
    DatasetIndex(dst).rebuild()
    dst.write_bytes("summary.json", src.read_bytes("summary.json"))


def clear_render(render: Storage) -> None:
    """Empty a previous run's render, commit markers first (so a half-cleared render
    never looks committed): a regression run renders every script afresh, or a stale
    video would hide the change it is there to catch."""
    for folder in ("records", *PAYLOAD_FOLDERS):
        for name in render.list(folder):
            render.delete(f"{folder}/{name}")
    for folder in (*TABLES, "state"):
        render.delete_folder(folder)
    for name in ("summary.json", "errors.jsonl"):
        if render.exists(name):
            render.delete(name)


def _read_optional(storage: Storage, rel: str) -> bytes | None:
    return storage.read_bytes(rel) if storage.exists(rel) else None


def compare_runs(base: Storage, cand: Storage, out: Storage, video_ids: list[str], thresholds: Thresholds,
                 pixels: bool = True):
    """Rows of measures, report images and PSNR series per script; `pixels` False
    (--expect-change) leaves out PSNR/SSIM and latents."""
    rows, images, psnr_series = [], {}, {}
    for vid in video_ids:
        row = {"id": vid}
        if not cand.exists(record_path(vid)):
            row.update(status="not rendered", regressed=True, regressed_measures=["render"])
        elif not base.exists(record_path(vid)):
            row.update(status="new (no baseline)", regressed=False)
        else:
            b_rec = json.loads(base.read_text(record_path(vid)))
            c_rec = json.loads(cand.read_text(record_path(vid)))
            with tempfile.TemporaryDirectory() as tmp:
                paths = []
                for name, store in (("b", base), ("c", cand)):
                    paths.append(Path(tmp) / f"{name}.mp4")
                    paths[-1].write_bytes(store.read_bytes(video_path(vid)))
                picks = [i for frames in filmstrip_picks(c_rec).values() for i in frames]
                video = compare_videos(paths[0], paths[1], picks, pixels=pixels)
            diff = latent_difference(_read_optional(base, latents_path(vid)),
                                     _read_optional(cand, latents_path(vid))) if pixels else None
            row.update(judge(b_rec, c_rec, video, diff, thresholds))
            row["status"] = "regressed" if row["regressed"] else "clean"
            images[vid] = script_images(out, vid, video, b_rec, c_rec, thresholds)
            if pixels:
                psnr_series[vid] = video.psnr
        rows.append(row)
    return rows, images, psnr_series


def _json_safe(value):
    return None if isinstance(value, float) and math.isinf(value) else value


def write_tables(out: Storage, rows: list[dict]) -> None:
    out.write_json("comparison.json", [{k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                                        for k, v in r.items()} for r in rows])
    flat = [{k: (",".join(v) if isinstance(v, list) else _json_safe(v)) for k, v in r.items()} for r in rows]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(flat), buf)
    out.write_bytes("comparison.parquet", buf.getvalue())


def judged_on(pixels: bool, suite_quality: list[dict]) -> str:
    """What the verdict rests on, for the verdict line and the report."""
    quality = ", ".join(q["metric"] for q in suite_quality) or "no quality metric measured in both runs"
    if pixels:
        return f"judged on pixels, latents, traces, quality ({quality}) and speed"
    return f"--expect-change: pixel comparisons skipped; judged on quality ({quality}) and speed"


def parse_args(argv=None) -> dict:
    """The flags given (the suite, a layer under them, is read once the flags name it)."""
    parser = RegressionSettings.parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return vars(parser.parse_args(argv))


def resolve(given: dict) -> tuple[Resolved, Suite, list]:
    """Settings over the suite's memory mode and policy over the defaults; the suite and its scripts."""
    first = RegressionSettings.from_flags(given).settings
    suite, scripts = load_suite(first.suite, first.endpoint_url)
    layer = {k: getattr(suite, k) for k in ("memory", "fidelity") if getattr(suite, k) is not None}
    return RegressionSettings.from_flags(given, [("suite", layer)]), suite, scripts


def run(resolved: Resolved, suite: Suite, scripts: list) -> int:
    args: RegressionSettings = resolved.settings
    out = Storage(args.output, args.endpoint_url)
    base = Storage(args.baseline, args.endpoint_url)
    render = Storage(out.url_for("render"), args.endpoint_url)
    ids = [n.video_id for s in scripts for n in s.nodes() if n.video]  # every node of a tree, compared one by one
    out.write_text("suite.jsonl", "".join(  # the suite's own scripts, each with the id it renders under
        json.dumps({**raw, "id": s.video_id}) + "\n" for raw, s in zip(suite.scripts, scripts)))
    memory, fidelity = args.memory, args.fidelity
    # lossless: x264 is not bit-reproducible otherwise, and PSNR should see the model
    job = args.pick(BatchSettings, scripts=out.url_for("suite.jsonl"), output=render.url, save_latents=True, crf=0)
    if render.list("records"):
        print(f"clearing the previous render in {render.url}")
        clear_render(render)
    status = batch.run(Resolved.of(job, "regression job"))
    if status == batch.EXIT_FAILED:
        print(f"verdict: run failed: the suite did not render (see {render.url_for('errors.jsonl')})")
        return EXIT_FAILED

    if not base.exists("summary.json"):
        copy_render(render, base)
        print(f"verdict: no baseline at {base.url}: created it from this run; later runs compare against it")
        return EXIT_CLEAN

    pixels = not args.expect_change
    rows, images, psnr_series = compare_runs(base, render, out, ids, suite.thresholds, pixels)
    write_tables(out, rows)
    suite_quality = judge_suite(rows, suite.thresholds)
    out.write_json("suite_quality.json", suite_quality)
    regressed = [r["id"] for r in rows if r.get("regressed")]
    problems = [f"{r['id']} ({', '.join(r['regressed_measures'])})" for r in rows if r.get("regressed")]
    problems += [f"suite mean {q['metric']} {q['change']:+.4g} (largest drop allowed {q['limit']:g})"
                 for q in suite_quality if q["regressed"]]
    failed = [r["id"] for r in rows if r["status"] == "not rendered"]
    if failed:
        verdict = f"run failed: {len(failed)} script(s) not rendered"
    elif problems:
        verdict = f"REGRESSION in {len(regressed)} of {len(rows)} script(s): " + "; ".join(problems)
    elif pixels:
        verdict = f"clean: {len(rows)} script(s) match the baseline"
    else:
        verdict = f"clean: {len(rows)} script(s) no worse than the baseline"
    verdict += f" [{judged_on(pixels, suite_quality)}; memory {memory}, {fidelity} policy]"
    plots = suite_plots(out, psnr_series, rows)
    page = write_html(out, f"MemFlow regression: {suite.name}", verdict, rows, images, plots, suite_quality,
                      suite.thresholds.flat())
    if args.promote:
        copy_render(render, base)
        verdict += f"; promoted to baseline {base.url}"
    print(f"report: {out.url_for(page)}")
    print(f"verdict: {verdict}")
    return EXIT_FAILED if failed else EXIT_REGRESSED if problems else EXIT_CLEAN


def main(argv=None) -> int:
    given = parse_args(argv)
    try:
        return run(*resolve(given))
    except (ValidationError, ScriptError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"verdict: run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # anything else is a failed run too, never "regression found"
        print(f"verdict: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from e


if __name__ == "__main__":
    sys.exit(main())
