"""Nightly regression renders: identical runs compare clean; changes are flagged by the right
measure; --expect-change judges quality and speed only. Every run measures quality with the
tiny CLIP and DINOv2 of tests/quality_models.py."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from jobs import regression
from memflow.config import PRESETS
from memflow.quality import METRICS
from memflow.transformer import build_transformer
from memflow.vae import WanVAE

from .browser import find_chromium
from .readme import run_block
from .quality_models import save_tiny_clip, save_tiny_dino

SUITE = {
    "name": "test-suite",
    "memory": "nam+sma",  # the suite's own setting; --memory overrides it
    # speed thresholds generous: a busy CI machine must not fake a regression
    "thresholds": {"fps_drop_max": 0.8, "chunk_seconds_increase_max": 4.0, "memory_increase_max": 0.1,
                   "quality_drop_max": {"temporal_flickering": 0.02},
                   "suite_quality_drop_max": {"temporal_flickering": 0.01}},
    "scripts": [
        {"id": "a", "seed": 5, "segments": [{"prompt": "a lighthouse at dusk", "seconds": 2},
                                            {"prompt": "a storm at sea", "seconds": 2}]},
        {"id": "b", "seed": 6, "segments": [{"prompt": "a fox in the snow", "seconds": 2.5},
                                            {"prompt": "the fox sleeps", "seconds": 1.5}]},
    ],
}


def _run(tmp: Path, name: str, *extra: str, baseline: Path | None = None, suite: Path | None = None):
    out = tmp / name
    status = regression.main(["--suite", str(suite or tmp / "suite.json"), "--baseline", str(baseline or tmp / "baseline"),
                              "--output", str(out), "--replicas", "1", "--clip-model", str(tmp / "clip"),
                              "--dino-model", str(tmp / "dino"), *extra])
    rows = json.loads((out / "comparison.json").read_text()) if (out / "comparison.json").exists() else None
    return status, {r["id"]: r for r in rows or []}, out


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory, ray_head):
    import ray

    tmp = tmp_path_factory.mktemp("regression")
    (tmp / "suite.json").write_text(json.dumps(SUITE))
    save_tiny_clip(tmp / "clip"), save_tiny_dino(tmp / "dino")
    ray.init(address=ray_head.gcs_address, log_to_driver=False)
    try:
        status, rows, _ = _run(tmp, "first")
        assert status == 0 and rows == {}, "the first run creates the baseline and compares nothing"
        assert sorted(p.name for p in (tmp / "baseline" / "records").iterdir()) == ["a.json", "b.json"]
        yield tmp
    finally:
        ray.shutdown()


def test_identical_runs_compare_clean(suite_dir, capsys):
    status, rows, out = _run(suite_dir, "first")  # the same output again: rendered afresh, not resumed
    assert status == 0
    assert "verdict: clean" in capsys.readouterr().out
    summary = json.loads((out / "render" / "summary.json").read_text())
    assert (summary["committed"], summary["skipped_already_committed"]) == (2, 0)
    for r in rows.values():
        assert r["psnr_min_db"] == "inf" and r["latent_max_abs"] == 0.0 and r["traces_match"]
        assert r["identical_frames"] == r["frames_candidate"] == r["frames_baseline"] > 0
        assert not r["regressed"] and not r["config_changed"]
        assert all(r[f"{m}_change"] == 0.0 and r[f"{m}_baseline"] is not None for m in METRICS)
    suite = json.loads((out / "suite_quality.json").read_text())
    assert [q["metric"] for q in suite] == list(METRICS) and not any(q["regressed"] for q in suite)


def test_quality_lands_in_records_and_parquet(suite_dir):
    """The batch job (run by the first regression run) measured every video on its
    replica: the record holds the metrics, the manifest and metrics tables carry them."""
    from cluster.dataset import DatasetIndex
    from cluster.storage import Storage

    base = suite_dir / "baseline"
    index = DatasetIndex(Storage(str(base)))
    manifest = index.read("manifest")
    metrics = {r["id"]: r for r in index.read("metrics")}
    assert sorted(r["id"] for r in manifest) == ["a", "b"]
    for row in manifest:
        record = json.loads((base / "records" / f"{row['id']}.json").read_text())
        q = record["quality"]
        assert q["frames"] == record["num_frames"] and q["backbones"]["clip"] == str(suite_dir / "clip")
        assert q["switches"][0]["frame"] == record["segments"][1]["start_frame"]
        for m in METRICS:
            assert row[m] == metrics[row["id"]][m] == q["video"][m] is not None
            assert [s[m] for s in row["segments"]] == [s[m] for s in q["segments"]]
            assert [s[m] for s in metrics[row["id"]]["segment_quality"]] == [s[m] for s in q["segments"]]
        assert 0 < q["video"]["temporal_flickering"] <= 1 and 0 <= q["video"]["clip_score"] <= 100
        assert metrics[row["id"]]["quality_s"] == q["seconds"] > 0


def test_readme_query_filters_segments(suite_dir, tmp_path):
    """The README's duckdb query, run on a dataset whose metric values are set by hand."""
    from cluster.dataset import DatasetIndex
    from cluster.storage import Storage

    data = tmp_path / "dataset"
    shutil.copytree(suite_dir / "baseline" / "records", data / "records")
    wanted = {("a", 1), ("b", 0)}
    for name in ("a", "b"):
        path = data / "records" / f"{name}.json"
        record = json.loads(path.read_text())
        record["quality"]["video"]["subject_consistency"] = 0.95 if name == "a" else 0.96
        for s in record["quality"]["segments"]:
            s["clip_score"] = 30.0 if (name, s["index"]) in wanted else 20.0
        path.write_text(json.dumps(record))
    record = json.loads((data / "records" / "a.json").read_text())  # a third video: clip fine, subject not
    record["id"], record["quality"]["video"]["subject_consistency"] = "c", 0.5
    (data / "records" / "c.json").write_text(json.dumps(record))
    assert DatasetIndex(Storage(str(data))).rebuild() == 3
    rows = run_block("clip_score >= 25", {"outputs/": f"{data}/"})["rows"]
    assert {(r[0], r[1]) for r in rows} == wanted


def test_changed_weight_is_flagged_by_pixels_and_latents(suite_dir):
    net = build_transformer(PRESETS["tiny"].transformer, seed=0)  # the tiny preset's own random weights
    with torch.no_grad():
        net.blocks[1].ffn.net[2].weight.mul_(4.0)
    net.save_pretrained(suite_dir / "model" / "transformer")
    status, rows, _ = _run(suite_dir, "weight", "--model", str(suite_dir / "model"))
    assert status == 1
    for r in rows.values():
        assert {"psnr", "latent"} <= set(r["regressed_measures"])
        assert "memory" not in r["regressed_measures"] and "frame_count" not in r["regressed_measures"]


def test_sma_off_is_flagged(suite_dir):
    status, rows, _ = _run(suite_dir, "no-sma", "--memory", "nam")
    assert status == 1
    for r in rows.values():  # SMA's picks vanish from the retrieval trace; the latents move with them
        assert {"traces", "latent"} <= set(r["regressed_measures"]) and not r["traces_match"]
        assert r["config_changed"] and r["frames_candidate"] == r["frames_baseline"]


def test_policy_change_is_flagged_and_named(suite_dir, capsys):
    status, rows, out = _run(suite_dir, "paper-policy", "--fidelity", "paper")
    assert status == 1
    assert "memory nam+sma, paper policy]" in capsys.readouterr().out
    for r in rows.values():
        assert (r["fidelity_baseline"], r["fidelity_candidate"]) == ("reference", "paper")
        assert r["config_changed"] and "latent" in r["regressed_measures"]
    record = json.loads((out / "render" / "records" / "a.json").read_text())
    assert record["model"]["fidelity"] == "paper"
    assert "memory policy (candidate)" in (out / "report" / "index.html").read_text()


def test_injected_slowdown_is_flagged_by_speed_only(suite_dir):
    """The baseline's recorded timings are made 10x faster: the candidate is 10x slower."""
    fast = suite_dir / "fast-baseline"
    shutil.copytree(suite_dir / "baseline", fast)
    for rec in (fast / "records").iterdir():
        r = json.loads(rec.read_text())
        r["timings"]["chunk_seconds"] = [s / 10 for s in r["timings"]["chunk_seconds"]]
        r["timings"]["generation_fps"] *= 10
        rec.write_text(json.dumps(r))
    status, rows, _ = _run(suite_dir, "slow", baseline=fast)
    assert status == 1
    for r in rows.values():
        assert set(r["regressed_measures"]) == {"fps", "chunk_seconds"}
        assert r["psnr_min_db"] == "inf"


def test_expect_change_on_the_same_model_is_clean(suite_dir, capsys):
    status, rows, out = _run(suite_dir, "expect-same", "--expect-change")
    assert status == 0
    verdict = capsys.readouterr().out
    assert "verdict: clean" in verdict and "pixel comparisons skipped" in verdict
    for r in rows.values():
        assert r["psnr_min_db"] is None and r["latent_max_abs"] is None and r["regressed_measures"] == []
        assert all(r[f"{m}_change"] == 0.0 for m in METRICS)
    assert not (out / "report" / "psnr.png").exists()


def test_expect_change_flags_a_degraded_model(suite_dir, capsys):
    """A model whose VAE decoder output is amplified 3x: harsher frames that jump from one
    to the next. Every pixel changes (not judged), and quality drops (judged)."""
    model = suite_dir / "harsh-vae"
    build_transformer(PRESETS["tiny"].transformer, seed=0).save_pretrained(model / "transformer")
    vae = WanVAE.from_config(PRESETS["tiny"].vae, seed=0).model  # the tiny preset's own VAE
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3.0)
    vae.save_pretrained(model / "vae")
    status, rows, out = _run(suite_dir, "degraded", "--expect-change", "--model", str(model))
    assert status == 1
    assert "REGRESSION" in capsys.readouterr().out
    for r in rows.values():
        assert "temporal_flickering" in r["regressed_measures"] and r["temporal_flickering_change"] < -0.02
        assert not {"psnr", "ssim", "latent", "traces", "frame_count"} & set(r["regressed_measures"])
        assert r["worst_change"] > 1
    suite = {q["metric"]: q for q in json.loads((out / "suite_quality.json").read_text())}
    assert suite["temporal_flickering"]["regressed"] and suite["temporal_flickering"]["limit"] == 0.01


def _chromium(page: Path, profile: Path, *flags: str, fragment: str = "") -> subprocess.CompletedProcess:
    chromium = find_chromium()  # skipped without one, unless MEMFLOW_REQUIRE_BROWSER=1 (CI)
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", "--disable-sync",
                          f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *flags,
                          page.as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for bad in ("Uncaught", "ERR_FILE_NOT_FOUND", "Failed to load resource", "Not allowed to load"):
        assert bad not in run.stderr
    return run


def test_report_opens_in_headless_chromium(suite_dir, tmp_path):
    status, rows, out = _run(suite_dir, "report", "--memory", "nam")
    page = out / "report" / "index.html"
    html = page.read_text()
    images = re.findall(r"src='([^']+)'", html)
    # two suite plots; per script a memory timeline, a strip per segment, quality bars, 3 heatmaps
    assert len(images) == 2 + 2 * (1 + 2 + 1 + 3)
    assert sum("-memory.png" in src for src in images) == 2 and sum("-quality.png" in src for src in images) == 2
    for src in images:
        data = (page.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", src
    dom = _chromium(page, tmp_path / "chrome", "--dump-dom").stdout
    assert "REGRESSION" in dom and dom.count("<img") == len(images)
    for script in SUITE["scripts"]:  # each segment's prompt under its frames
        for seg in script["segments"]:
            assert f"“{seg['prompt']}”</span></figcaption>" in dom

    def order(text: str) -> list[str]:
        table = text[text.index("suite-table"):text.index("</table>", text.index("suite-table"))]
        return re.findall(r'<a href="#(\w+)">', table)

    default = order(dom)
    assert default == [r["id"] for r in sorted(rows.values(), key=lambda r: r["worst_change"], reverse=True)]
    fragment = "#sort=-id" if default == ["a", "b"] else "#sort=id"  # the order the page does not open with
    assert order(_chromium(page, tmp_path / "chrome", "--dump-dom", fragment=fragment).stdout) == default[::-1]


def test_promote_makes_the_candidate_the_baseline(suite_dir):
    promoted = suite_dir / "promoted-baseline"
    shutil.copytree(suite_dir / "baseline", promoted)
    status, _, _ = _run(suite_dir, "promote", "--memory", "nam", "--promote", baseline=promoted)
    assert status == 1
    status, rows, _ = _run(suite_dir, "after-promote", "--memory", "nam", baseline=promoted)
    assert status == 0 and all(r["psnr_min_db"] == "inf" for r in rows.values())


def test_bad_suite_fails_the_run(suite_dir, capsys):
    bad = suite_dir / "bad.json"
    bad.write_text(json.dumps({"scripts": [{"prompts": ["no seed here"]}]}))
    status, _, _ = _run(suite_dir, "bad", suite=bad)
    assert status == 2
    assert "scripts.0.seed" in capsys.readouterr().err


def test_a_suite_of_trees_and_continuations_is_compared_node_by_node(suite_dir):
    stories = suite_dir / "stories.json"
    stories.write_text(json.dumps({"name": "stories", "thresholds": SUITE["thresholds"], "scripts": [
        {"id": "more", "continues": "t-a", "segments": [{"prompt": "night falls", "seconds": 1}]},
        {"id": "t", "seed": 3, "segments": [{"prompt": "a harbour", "seconds": 1.5}], "branches": [
            {"id": "t-a", "segments": [{"prompt": "fog rolls in", "seconds": 1}]},
            {"id": "t-b", "video": False, "segments": [{"prompt": "a ship leaves", "seconds": 1}],
             "branches": [{"id": "t-b-c", "segments": [{"prompt": "the ship is gone", "seconds": 1}]}]}]}]}))
    baseline = suite_dir / "stories-baseline"
    status, rows, _ = _run(suite_dir, "stories-first", suite=stories, baseline=baseline)
    assert status == 0 and sorted(p.name for p in (baseline / "records").iterdir()) == \
        ["more.json", "t-a.json", "t-b-c.json", "t.json"]
    status, rows, _ = _run(suite_dir, "stories-again", suite=stories, baseline=baseline)
    assert status == 0 and sorted(rows) == ["more", "t", "t-a", "t-b-c"], "every node, t-b (no video) left out"
    for r in rows.values():
        assert r["psnr_min_db"] == "inf" and r["latent_max_abs"] == 0.0 and r["traces_match"], r["id"]
