"""End to end on the tiny preset: script -> mp4 on disk, read back with PyAV; the CLI."""
import json
import subprocess
import sys

import pytest

from memflow.pipeline import MemFlowGenerator
from memflow.script import parse_script
from memflow.video import probe_mp4


@pytest.fixture(scope="module")
def tiny():
    return MemFlowGenerator.from_preset("tiny", device="cpu")


def test_six_segment_script_renders_to_mp4(tiny, tmp_path):
    script = parse_script({"id": "six", "seed": 9, "segments": [
        {"prompt": f"chapter {i} of a long story about a lighthouse", "seconds": 1.5} for i in range(6)]})
    plan = script.plan()
    result = tiny.render(script, tmp_path / "six.mp4")
    info = probe_mp4(tmp_path / "six.mp4")
    assert info["frames"] == result.frames == plan.num_video_frames == 1 + 4 * (plan.num_latent_frames - 1)
    assert info["fps"] == pytest.approx(16)
    assert (info["height"], info["width"]) == (64, 64)
    assert len(plan.segments) == 6 and len(plan.switch_chunks) == 5


def test_resolution_and_fps_from_the_script(tiny, tmp_path):
    script = parse_script({"prompts": ["a boat"], "resolution": [48, 80], "fps": 8})
    script = script.model_copy(update={"segments": [script.segments[0].model_copy(update={"seconds": 3})]})
    tiny.render(script, tmp_path / "r.mp4")
    info = probe_mp4(tmp_path / "r.mp4")
    assert (info["height"], info["width"], info["fps"]) == (48, 80, 8)
    assert info["frames"] == script.plan().num_video_frames


def test_cli_renders_and_summarises(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"segments": [{"prompt": "a kite", "seconds": 1.5},
                                               {"prompt": "a kite in a storm", "seconds": 1.5}]}))
    out = tmp_path / "out.mp4"
    run = subprocess.run([sys.executable, "-m", "memflow", "render", "--script", str(script), "--preset", "tiny",
                          "-o", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    frames = probe_mp4(out)["frames"]
    assert f"{frames} frames" in run.stdout and "FPS" in run.stdout
    assert "chunk" in run.stderr  # the progress bar


def test_cli_inline_prompts_and_bad_script(tmp_path):
    out = tmp_path / "p.mp4"
    ok = subprocess.run([sys.executable, "-m", "memflow", "render", "--prompt", "a", "--prompt", "b",
                         "--seconds", "1", "-o", str(out), "--device", "cpu"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert probe_mp4(out)["frames"] == parse_script(
        {"segments": [{"prompt": "a", "seconds": 1}, {"prompt": "b", "seconds": 1}]}).plan().num_video_frames
    bad = subprocess.run([sys.executable, "-m", "memflow", "render", "--script", '{"segments": []}',
                          "-o", str(tmp_path / "x.mp4")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "segments" in bad.stderr and not (tmp_path / "x.mp4").exists()
