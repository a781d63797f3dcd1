"""The code passes the project's lint rules (pyproject.toml [tool.ruff.lint])."""

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
