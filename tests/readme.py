"""The README's Python examples, for the tests that run them as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(marker: str) -> str:
    """The one ```python block of the README that contains `marker`, dedented."""
    blocks = [b for b in re.findall(r"^( *)```python\n(.*?)^\1```", README.read_text(), re.S | re.M) if marker in b[1]]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {marker!r}"
    indent, body = blocks[0]
    return "\n".join(line[len(indent):] for line in body.splitlines())


def run_block(marker: str, replace: dict[str, str]) -> dict:
    """Run that block with some text replaced (paths); returns its variables."""
    code = python_block(marker)
    for old, new in replace.items():
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, f"README.md ({marker})", "exec"), scope)
    return scope
