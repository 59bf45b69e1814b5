"""The test harness itself: a session whose Ray head dies stops at once and says why; the
browser test skips where no browser is installed, unless CI requires it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .browser import REQUIRE_ENV, find_chromium

REPO = Path(__file__).resolve().parent.parent

INNER = '''
import time

import psutil
import ray


def test_head_dies_mid_call(ray_head):
    ray.init(address=ray_head.gcs_address, log_to_driver=False)

    @ray.remote
    def forever():
        time.sleep(3600)

    ref = forever.remote()
    # the head's GCS is killed (as by the OOM killer): `ray start --block` sees it and exits
    for p in psutil.Process(ray_head.process.pid).children(recursive=True):
        if p.name().startswith("gcs_server"):
            p.kill()
    ray.get(ref)  # blocks for ever unless the session is stopped


def test_after_the_head_died():
    pass
'''


def test_a_session_whose_ray_head_dies_stops_at_once_with_the_reason(tmp_path):
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(INNER))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
                          "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO), "-q", str(inner)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = run.stdout + run.stderr
    assert run.returncode == 3, out[-3000:]
    assert "the test session's Ray head died (`ray start` exited with 1" in out, out[-3000:]
    assert "test_after_the_head_died" not in out.replace(str(inner), "")  # the session stopped there
    print(f"the session ended {took:.0f} s after it started")


def test_browser_tests_skip_without_a_browser_unless_required(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium on it
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        find_chromium()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ENV}=1"):
        find_chromium()
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert find_chromium() == str(fake)


def test_ci_requires_the_browser():
    ci = (REPO / ".ci" / "run").read_text()
    assert f"export {REQUIRE_ENV}=1" in ci and "apt-get install" in ci and "chromium" in ci
    assert os.access(REPO / ".ci" / "run", os.X_OK) or ci.startswith("#!")
