"""The README's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parent.parent / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_starts_with_the_two_commands() -> None:
    first = re.search(r"```sh\n(.*?)```", README, flags=re.S)
    assert first is not None
    assert first.group(1).splitlines()[:2] == [
        "make serve     # creates .venv, installs, starts keel on http://127.0.0.1:4000 (SQLite in ./.keel/)",
        "make test      # creates .venv, installs, runs the whole test suite",
    ]


def test_mock_provider_example_runs(tmp_path: Path) -> None:
    block = next(b for b in python_blocks() if "MockProvider" in b)
    r = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Mock reply to: hi"
