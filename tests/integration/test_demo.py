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
    assert val and float(val.group(2)) < float(val.group(1)) - 0.5, out[-3000:]
    assert re.search(r"swarm steps\s*│\s*(\d+)", out) and "sample from the final checkpoint" in out
    checkpoints = list((tmp_path / "coordinator" / "checkpoints").glob("step-*.pt"))
    assert checkpoints and any(int(p.stem.split("-")[1]) > 0 for p in checkpoints)
    for name in ("coordinator.log", "peer-0.log", "peer-1.log"):
        assert (tmp_path / name).stat().st_size > 0
