"""deploy/hivefold-peer.service: an unprivileged, low-priority peer that restarts, whose ExecStart (with the
documented drop-ins) is a valid peer command, verified by systemd-analyze where it is installed (see
test_deploy.py)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.deploy_cases import (
    UNIT,
    fenced_blocks,
    parse_hivefold,
)

# ---------------------------------------------------------------------------------------------------------------
# systemd

def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key several times (Environment=)."""
    out, section = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            section = s.strip("[]")
            continue
        key, sep, value = s.partition("=")
        assert sep, f"hivefold-peer.service: not KEY=VALUE: {s}"
        out.append((section, key.strip(), value.strip()))
    return out


def unit_settings(text: str) -> dict[str, str]:
    return {key: value for section, key, value in unit_entries(text) if section == "Service"}


def documented_drop_ins() -> list[str]:
    """The drop-ins the unit's comments and the README tell volunteers to write with `systemctl edit`."""
    in_unit = "\n".join(line.lstrip("#").strip() for line in UNIT.read_text().splitlines()
                        if re.match(r"#\s+(\[Service\]|Environment=)", line))
    in_readme = [block for lang, block in fenced_blocks() if lang == "ini"]
    assert "[Service]" in in_unit and in_readme, "the drop-in setting the coordinator is no longer documented"
    return [in_unit, *in_readme]


def exec_start(text: str) -> list[str]:
    """ExecStart as systemd runs it: specifiers, then ${VAR} as one word and $VAR split on spaces."""
    env, specifiers = {}, {"%H": "volunteer-host", "%S": "/var/lib", "%%": "%"}
    for section, key, value in unit_entries(text):
        if section == "Service" and key == "Environment":
            for assignment in shlex.split(value):
                name, sep, val = assignment.partition("=")
                assert sep and re.fullmatch(r"[A-Za-z_]\w*", name), f"invalid Environment= assignment {assignment!r}"
                env[name] = re.sub(r"%.", lambda m: specifiers[m.group(0)], val)
    line = re.sub(r"%.", lambda m: specifiers[m.group(0)], unit_settings(text)["ExecStart"]).lstrip("-@+!:")
    argv = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$(\w+)", word)
        name_of = (m.group(1),) if m else re.findall(r"\$\{(\w+)\}", word)
        for name in name_of:
            assert name in env, f"ExecStart uses ${name}, which no Environment= sets"
        if m:
            argv += env[m.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda v: env[v.group(1)], word))
    return argv


def test_systemd_unit_runs_an_unprivileged_low_priority_peer_that_restarts():
    s = unit_settings(UNIT.read_text())
    assert s.get("Restart") in ("on-failure", "always"), f"Restart={s.get('Restart')}"
    assert s.get("DynamicUser") == "yes" and s.get("StateDirectory"), "expected DynamicUser=yes and a StateDirectory"
    assert s.get("User") in (None, ""), "DynamicUser allocates the user"
    assert int(s.get("Nice", 0)) >= 10, f"Nice={s.get('Nice')}: a volunteer's peer yields the CPU"
    assert s.get("CPUSchedulingPolicy") in ("batch", "idle"), f"CPUSchedulingPolicy={s.get('CPUSchedulingPolicy')}"
    assert s.get("IOSchedulingClass") in ("idle", "3"), f"IOSchedulingClass={s.get('IOSchedulingClass')}"
    # control-group (the default) sends SIGTERM to the DHT helpers too, at once: the peer could no longer hand
    # its state to the keeper on the way out.
    assert s.get("KillMode") == "mixed", f"KillMode={s.get('KillMode')}: SIGTERM must reach hivefold alone"
    assert s.get("NoNewPrivileges", "yes") == "yes" and s.get("CapabilityBoundingSet", None) == "", "hardening"


@pytest.mark.parametrize("drop_in", [None, 0, 1], ids=["defaults", "unit-comment-drop-in", "readme-drop-in"])
def test_systemd_exec_start_is_a_valid_peer_command_writing_only_its_state_directory(drop_in):
    text = UNIT.read_text()
    if drop_in is not None:
        text += "\n" + documented_drop_ins()[drop_in]
    argv = exec_start(text)
    assert argv[0].startswith("/") and argv[0].endswith("/hivefold"), f"ExecStart runs {argv[0]}"
    cmd = parse_hivefold(argv[1:], "hivefold-peer.service ExecStart")
    assert cmd.ns.command == "peer"
    state = Path("/var/lib") / unit_settings(text)["StateDirectory"]
    assert cmd.config.workdir == state, f"--workdir {cmd.config.workdir}: the only writable place is {state}"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify refuses a unit whose ExecStart binary is missing, and /opt/hivefold/.venv exists only on a volunteer's
    # machine: verify a copy that differs in that path alone, pointing at the hivefold this test runs with.
    binary = Path(sys.executable).parent / "hivefold"
    if not binary.exists():
        pytest.skip(f"no hivefold executable beside {sys.executable} to stand in for ExecStart's")
    original = UNIT.read_text()
    exe = unit_settings(original)["ExecStart"].split()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(original.replace(f"ExecStart={exe} ", f"ExecStart={binary} "))
    assert f"ExecStart={binary} " in copy.read_text()
    r = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if UNIT.name in line]
    assert r.returncode == 0 and not complaints, f"systemd-analyze verify (exit {r.returncode}):\n{r.stdout}{r.stderr}"
