"""``hivefold demo``, the README's main command, end to end (shortened to under a minute of training)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_demo_trains_checkpoints_and_samples(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "hivefold", "demo", "--minutes", "0.75", "--workdir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    val = re.search(r"validation loss\s*│\s*([\d.]+) → ([\d.]+)", out)
    assert val and float(val.group(2)) < float(val.group(1)) - 0.5, out[-3000:] + _warnings(tmp_path)
    assert re.search(r"swarm steps\s*│\s*(\d+)", out) and "sample from the final checkpoint" in out
    checkpoints = list((tmp_path / "coordinator" / "checkpoints").glob("step-*.pt"))
    assert checkpoints and any(int(p.stem.split("-")[1]) > 0 for p in checkpoints)
    for name in ("coordinator.log", "peer-0.log", "peer-1.log"):
        assert (tmp_path / name).stat().st_size > 0


def _warnings(workdir: Path) -> str:
    """The demo's logged warnings and errors, and what its keeper did, so that a failure here says why."""
    out = ["", "logged warnings:"]
    for log in sorted(workdir.glob("*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if re.search(r" (WARN|WARNING|ERROR) | keeper hivefold\.keeper", line)]
        out += [f"{log.name}: {line}" for line in (lines if len(lines) <= 30 else lines[:15] + lines[-15:])]
    return "\n".join(out)
