"""``hivefold doctor``: a volunteer's pre-flight check, one line per check, before ``hivefold peer``.

What makes volunteers give up on decentralized training, checked before it costs them an evening:
mismatched versions (hivemind's wire protocol, protobuf stubs that refuse to load), a libp2p daemon
that does not start, a coordinator or DHT bootstrap node that cannot be reached, a machine that
others cannot connect to (then ``--client-mode``), a device that does not train. Doctor only reads:
it asks the coordinator for its status document, never registers, and joins the DHT as a client.
The checks that start something here (libp2p daemons, the model) live in ``peer.doctor_probes``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import sys
import time
from importlib import metadata, util
from pathlib import Path

from hivefold.errors import ConfigError, HivefoldError
from hivefold.netaddr import parse_host_port

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
COMPARED = ("python", "hivefold", "torch", "hivemind", "protobuf", "grpcio")  # what the status document reports


@dataclasses.dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL | SKIP
    detail: str
    advice: str = ""  # what to do, for WARN and FAIL
    seconds: float | None = None  # what was timed: the daemon's start, the RPC, the DHT join

    def line(self) -> str:
        advice = f" — {self.advice}" if self.advice and self.status in (WARN, FAIL) else ""
        return f"{self.status}  {self.name:<14} {self.detail}{advice}"


# --- versions ---------------------------------------------------------------------------------------


def version_problems(installed: dict[str, str | None], requires: list[str], requires_python: str | None,
                     stubs: dict[str, str], coordinator: dict[str, str | None] | None) -> list[tuple[str, str]]:
    """``[(WARN|FAIL|PASS, text)]`` about this machine's versions; PASS entries are notes. Pure.

    ``installed``: version by canonical distribution name, plus ``python``; ``requires``: the hivefold
    distribution's requirement strings; ``stubs``: the oldest protobuf / grpcio the generated stubs load
    with; ``coordinator``: the ``software`` entry of the coordinator's status document (None: not asked).
    What must fit: hivefold's own requirements; protobuf and grpcio at least as new as the stubs' code
    generators; hivemind's minor version equal to the swarm's (its wire protocol). Torch may differ.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    def parse(v: str | None) -> Version | None:
        try:
            return Version(v) if v else None
        except InvalidVersion:
            return None

    out: list[tuple[str, str]] = []
    python = parse(installed.get("python"))
    if requires_python and python and not Requirement(f"python{requires_python}").specifier.contains(python, True):
        out.append((FAIL, f"python {python} does not satisfy hivefold's {requires_python}: use a newer Python"))
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev tools): not needed to run a peer
        name = canonicalize_name(req.name)
        have = installed.get(name)
        if have is None:
            out.append((FAIL, f"{req.name} is not installed: pip install '{req}'"))
        elif (v := parse(have)) is None or not req.specifier.contains(v, prereleases=True):
            out.append((FAIL, f"{req.name} {have} does not satisfy hivefold's {req}: pip install '{req}'"))
    for dist, oldest in stubs.items():
        have = parse(installed.get(dist))
        if have is not None and have < Version(oldest):
            out.append((FAIL, f"{dist} {have} is older than the {oldest} the generated stubs need: "
                              f"pip install '{dist}>={oldest}'"))
    if coordinator is not None:
        theirs = {canonicalize_name(k): v for k, v in coordinator.items()}
        if not theirs:
            out.append((WARN, "the coordinator does not report its versions (an older hivefold)"))
        mine, swarm = parse(installed.get("hivemind")), parse(theirs.get("hivemind"))
        if mine and swarm and (mine.major, mine.minor) != (swarm.major, swarm.minor):
            out.append((FAIL, f"the swarm runs hivemind {swarm}, this machine {mine}: their wire protocols differ; "
                              f"pip install hivemind=={swarm}"))
        for dist in ("hivefold", "torch"):
            if theirs.get(dist) and installed.get(dist) and theirs[dist] != installed[dist]:
                level = WARN if dist == "hivefold" else PASS
                out.append((level, f"the coordinator runs {dist} {theirs[dist]}, this machine {installed[dist]}"
                                   + (": install the same hivefold" if level == WARN else " (fine)")))
        if swarm and not any(level == FAIL for level, _ in out):
            out.append((PASS, "hivemind matches the coordinator's"))
    return out


def _stub_versions() -> tuple[dict[str, str], list[tuple[str, tuple]]]:
    """The oldest protobuf and grpcio the generated code accepts (ours and hivemind's), read, not imported."""
    files = [Path(util.find_spec("protos").submodule_search_locations[0]) / "coordinator_pb2.py"]
    hivemind = util.find_spec("hivemind")
    if hivemind is not None:
        files += sorted(Path(hivemind.submodule_search_locations[0]).glob("proto/*_pb2.py"))
    gencodes = []
    for f in files:
        m = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'",
                      f.read_text())
        if m:
            gencodes.append((f.name, (int(m[1]), int(m[2]), int(m[3]), m[4])))
    stubs = {}
    if gencodes:
        stubs["protobuf"] = ".".join(map(str, max(g[:3] for _, g in gencodes)))
    grpc_stub = Path(files[0]).with_name("coordinator_pb2_grpc.py").read_text()
    if m := re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub):
        stubs["grpcio"] = m[1]
    return stubs, gencodes


def _protobuf_verdicts(gencodes: list[tuple[str, tuple]]) -> list[tuple[str, str]]:
    """What the installed protobuf runtime itself says about each generated file (its major-version rules)."""
    import warnings

    try:
        from google.protobuf import runtime_version as rv
    except ImportError:  # a runtime older than any gencode that checks: version_problems says so
        return []
    out = []
    for name, (major, minor, patch, suffix) in gencodes:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rv.ValidateProtobufRuntimeVersion(rv.Domain.PUBLIC, major, minor, patch, suffix, name)
            except rv.VersionError as e:
                out.append((FAIL, f"{e}"))
        out += [(WARN, str(w.message)) for w in caught]
    return list(dict.fromkeys(out))


def check_versions(coordinator_software: dict | None) -> Check:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        requires = metadata.requires("hivefold") or []
        requires_python = metadata.metadata("hivefold")["Requires-Python"]
    except metadata.PackageNotFoundError:
        requires, requires_python = [], None
    names = {canonicalize_name(Requirement(r).name) for r in requires} | set(COMPARED) - {"python"}
    installed: dict[str, str | None] = {"python": platform.python_version()}
    for name in sorted(names):
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    stubs, gencodes = _stub_versions()
    found = version_problems(installed, requires, requires_python, stubs, coordinator_software)
    if not any(level == FAIL and text.startswith("protobuf") for level, text in found):
        found += _protobuf_verdicts(gencodes)
    if not requires:
        found.append((WARN, "hivefold is not installed as a package, so its requirements are unknown"))
    summary = ", ".join(f"{k} {installed.get(k) or 'missing'}" for k in COMPARED)
    levels = [level for level, _ in found]
    status = FAIL if FAIL in levels else WARN if WARN in levels else PASS
    notes = "; ".join(text for level, text in found if level == PASS)
    problems = "; ".join(text for level, text in found if level != PASS)
    return Check("versions", status, summary + (f"; {notes}" if notes else ""), advice=problems)


# --- the coordinator --------------------------------------------------------------------------------


def check_coordinator(address: str, timeout: float, trust=None) -> tuple[Check, dict | None]:
    """One GetStatus (retried until ``timeout`` while the coordinator is unreachable); no Register."""
    import grpc

    try:
        from hivefold.client import CoordinatorClient, describe_rpc_error
        from hivefold.retry import call_with_retry
        from hivefold.tls import TrustError
        from protos import coordinator_pb2 as pb
    except Exception as e:  # noqa: BLE001 - e.g. stubs that refuse the installed protobuf or grpcio
        return Check("coordinator", FAIL, f"cannot load the gRPC stubs: {e}", "see the versions check"), None

    host, port = parse_host_port(address, flag="--coordinator")
    client = CoordinatorClient(address, trust=trust, give_up_after=timeout)
    deadline, took = time.monotonic() + timeout, [0.0]

    def attempt():
        t0 = time.perf_counter()
        try:
            return client.stub.GetStatus(pb.GetStatusRequest(), timeout=max(0.5, deadline - time.monotonic()))
        finally:
            took[0] = time.perf_counter() - t0

    try:
        status = json.loads(call_with_retry(attempt, what=f"GetStatus at {address}", cap=2.0,
                                            give_up_after=timeout).status_json)
    except TrustError as e:
        return Check("coordinator", FAIL, str(e), "the certificate decides whom this peer talks to"), None
    except grpc.RpcError as e:
        return Check("coordinator", FAIL, f"{address} answered {describe_rpc_error(e)}",
                     "is this the coordinator's gRPC address (its --listen), not its HTTP one?"), None
    except HivefoldError:
        return Check("coordinator", FAIL, f"no answer from {address} within {timeout:g} s",
                     f"check the address (the coordinator's --listen), that the coordinator is running, and that "
                     f"a firewall lets TCP port {port} through to {host} (try: nc -vz {host} {port})"), None
    finally:
        client.close()
    return Check("coordinator", PASS, f"{address} answered GetStatus in {took[0] * 1000:.0f} ms: run "
                 f"{status.get('run_id', '?')}, {status.get('peers_online', 0)} peers online, swarm step "
                 f"{status.get('global_step', 0)}", seconds=took[0]), status


# --- running them -----------------------------------------------------------------------------------


UNEXPECTED = "unexpected: please report this line"


def _guarded(name: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        return Check(name, FAIL, f"{type(e).__name__}: {e}", UNEXPECTED)


def run_doctor(*, coordinator: str | None, device: str, as_json: bool, timeout: float, trust=None) -> int:
    """Run every check, print them, return the exit status (0: no FAIL, 1: a FAIL)."""
    if coordinator:
        parse_host_port(coordinator, flag="--coordinator")
    if not timeout > 0:
        raise ConfigError(f"--timeout must be > 0, got {timeout}")
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # the checks' lines say what went wrong, not hivemind's
    logging.basicConfig(level=logging.ERROR)
    checks: list[Check] = []

    def report(check: Check) -> None:
        if check.advice == UNEXPECTED and versions.status == FAIL:  # e.g. stubs that refuse the installed protobuf
            check.advice = "probably the version problem above: see the versions check"
        checks.append(check)
        if not as_json:
            print(check.line(), flush=True)

    if coordinator:
        found = _guarded("coordinator", check_coordinator, coordinator, timeout, trust)
        reached, status = found if isinstance(found, tuple) else (found, None)
    else:
        reached, status = Check("coordinator", SKIP, "no --coordinator given: the coordinator and DHT bootstrap "
                                "checks are skipped"), None
    versions = _guarded("versions", check_versions, status.get("software", {}) if status else None)
    report(versions)
    report(reached)
    from peer.doctor_probes import check_device, network_checks

    network_checks(status, timeout, report, asked=bool(coordinator))
    report(_guarded("device", check_device, device))

    failed = [c for c in checks if c.status == FAIL]
    warned = sum(c.status == WARN for c in checks)
    if failed:
        summary = (f"{len(failed)} of {len(checks)} checks failed ({', '.join(c.name for c in failed)}): fix the "
                   "FAIL lines and run hivefold doctor again")
    else:
        summary = (f"ready: no check failed ({warned} warning{'s' * (warned != 1)}, "
                   f"{sum(c.status == SKIP for c in checks)} skipped)")
    if as_json:
        print(json.dumps({"ok": not failed, "summary": summary, "checks": [dataclasses.asdict(c) for c in checks]},
                         indent=2))
    else:
        print(f"doctor: {summary}")
    sys.stdout.flush()
    return 1 if failed else 0
