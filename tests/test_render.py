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
                          "-o", str(out), "--device", "cpu", "--threads", "1"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    frames = probe_mp4(out)["frames"]
    assert f"{frames} frames" in run.stdout and "FPS" in run.stdout
    assert "(load" in run.stdout and "1 torch threads," in run.stdout and "reference policy" in run.stdout
    bars = run.stderr.replace("\r", "\n")
    assert "chunk" in bars  # generation's progress bar
    # decoding and encoding have their own bar, over frames, that moves (not one frozen at 100%)
    assert f"decode+encode: 100%|██████████| {frames}/{frames}" in bars
    assert any(f"decode+encode:" in line and f"/{frames} " in line and f" {frames}/" not in line
               for line in bars.splitlines()), "the bar showed frames before the last one"


def test_cli_caps_torch_threads_and_lets_waiting_threads_sleep(tmp_path, monkeypatch):
    import os

    import torch

    from memflow import cli

    cpu_max = tmp_path / "cpu.max"  # a cgroup v2 quota as a container sees it: 1 CPU
    cpu_max.write_text("100000 100000\n")
    assert cli.usable_cpus(str(cpu_max)) == 1
    cpu_max.write_text("max 100000\n")
    assert cli.usable_cpus(str(cpu_max)) == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    before = torch.get_num_threads()
    try:
        assert cli.limit_threads(1) == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        assert 1 <= cli.limit_threads(None) <= min(8, cli.usable_cpus())
    finally:
        torch.set_num_threads(before)


def test_cli_help_explains_seconds_with_several_prompts():
    run = subprocess.run([sys.executable, "-m", "memflow", "render", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    assert "length of EACH --prompt segment" in text and "3 prompts with --seconds 5 make a 15 s video" in text
    assert "--seconds 5 -o fox.mp4 # two segments of 5 s: a 10 s video" in text


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
    long = subprocess.run([sys.executable, "-m", "memflow", "render", "--prompt", "a", "--seconds", "1e9",
                           "-o", str(tmp_path / "y.mp4")], capture_output=True, text=True, timeout=300)
    assert long.returncode == 2 and "above this job's limit of 600 s" in long.stderr
