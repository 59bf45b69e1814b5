"""Nightly regression renders: identical runs compare clean; changes are flagged by the right measure."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from jobs import regression
from memflow.config import PRESETS
from memflow.transformer import build_transformer

from .browser import find_chromium

SUITE = {
    "name": "test-suite",
    # speed thresholds generous: a busy CI machine must not fake a regression
    "thresholds": {"fps_drop_max": 0.8, "chunk_seconds_increase_max": 4.0, "memory_increase_max": 0.1},
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
                              "--output", str(out), "--replicas", "1", *extra])
    rows = json.loads((out / "comparison.json").read_text()) if (out / "comparison.json").exists() else None
    return status, {r["id"]: r for r in rows or []}, out


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory, ray_head):
    import ray

    tmp = tmp_path_factory.mktemp("regression")
    (tmp / "suite.json").write_text(json.dumps(SUITE))
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


def test_report_opens_in_headless_chromium(suite_dir, tmp_path):
    status, rows, out = _run(suite_dir, "report", "--memory", "nam")
    page = out / "report" / "index.html"
    html = page.read_text()
    images = [src for src in __import__("re").findall(r"src='([^']+)'", html)]
    assert len(images) >= 2 + 2 * 2  # two plots, a filmstrip and heatmaps per script
    for src in images:
        data = (page.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", src
    chromium = find_chromium()  # skipped without one, unless MEMFLOW_REQUIRE_BROWSER=1 (CI)
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--no-first-run", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chrome'}", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REGRESSION" in run.stdout and run.stdout.count("<img") == len(images)
    for bad in ("Uncaught", "ERR_FILE_NOT_FOUND", "Failed to load resource", "Not allowed to load"):
        assert bad not in run.stderr


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
