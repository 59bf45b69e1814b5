"""Where the browser tests find Chromium, and what they do without it.

A fresh machine (the README's test command) has no browser: the tests that open a
page in one are skipped there, saying so. CI must run them: `.ci/run` installs
Debian's chromium and sets MEMFLOW_REQUIRE_BROWSER=1, which turns the skip into a
failure, so a CI image that lost its browser cannot pass quietly."""
from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "MEMFLOW_REQUIRE_BROWSER"


def find_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    why = "no chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{why}; {REQUIRE_ENV}=1 requires it (as .ci/run does)")
    pytest.skip(f"{why}; set {REQUIRE_ENV}=1 to make this a failure")
