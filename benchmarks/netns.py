"""Network namespaces for benchmarks/wan.py: peers behind ``tc tbf``-capped veth links, built and always torn down.

A bridge in the root namespace holds the coordinator's address; each peer gets its own namespace
and a veth pair whose both ends a token bucket caps (the namespace side caps its upload, the bridge
side its download). ``Testbed`` builds it and removes everything it made, also on SIGINT/SIGTERM;
``remove_stale`` clears what a killed run left; netns_check.py checks the caps with plain TCP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SUBNET = ipaddress.ip_network("10.77.0.0/24")
HOST_IP = "10.77.0.1"  # the bridge: coordinator, its DHT node and keeper
NS_PREFIX = "hfwan-"  # namespaces hfwan-<pid>-p<i>; links hfwb<pid> (bridge), hfwv<pid>p<i> (veth, bridge side)
UNCAPPED = "10gbit"  # the htb classes' own rate: never the bottleneck
CMD_TIMEOUT_S = 20.0


class SetupError(Exception):
    """The machine cannot host the testbed (exit code 2)."""


# --- signals: every namespace goes, whatever stops the run ------------------------------------------------


class Signals:
    """SIGINT/SIGTERM/SIGHUP become exceptions, so ``finally`` blocks tear the testbed down. Inside
    ``shielded()`` (building or tearing down the network) a signal waits until the block is done; once one
    was raised, later ones only say that cleanup is under way, so the cleanup itself is never cut short."""

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.raised = False

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, self._handler)

    def _handler(self, signum, _frame) -> None:
        if self.raised:
            print(f"wan: {signal.Signals(signum).name} while cleaning up; still stopping the swarm and removing "
                  "the namespaces", file=sys.stderr, flush=True)
            return
        if self.depth:
            self.pending = signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def shielded(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None and not self.raised:
                signum, self.pending = self.pending, None
                self._raise(signum)


SIGNALS = Signals()


# --- the network ------------------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def tbf_args(mbit: float) -> list[str]:
    """tbf at ``mbit``: see the module docstring for the burst and queue sizes."""
    rate = mbit * 1e6 / 8  # bytes per second
    burst = max(64 * 1024, int(rate * 0.004))
    limit = max(int(rate * 0.050), 2 * burst)
    return ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "limit", str(limit)]


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def list_links() -> list[str]:
    return [link["ifname"] for link in json.loads(sh("ip", "-j", "link", "show").stdout or "[]")]


def kill_namespace_processes(ns: str) -> None:
    """Every process still inside ``ns`` (a peer's hivemind helpers, its libp2p daemon): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        pids = [int(p) for p in sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and sh("ip", "netns", "pids", ns, check=False).stdout.split():
            time.sleep(0.1)


class Testbed:
    """The bridge, one namespace and veth pair per peer, the caps; ``with`` removes all of it again."""

    def __init__(self, peers: int, mbit: float, *, cap_coordinator: bool = False, tag: int | None = None):
        self.peers, self.mbit, self.cap_coordinator = peers, mbit, cap_coordinator
        self.tag = os.getpid() if tag is None else tag
        self.bridge = f"hfwb{self.tag}"
        self.ns = [f"{NS_PREFIX}{self.tag}-p{i}" for i in range(peers)]
        self.veth = [f"hfwv{self.tag}p{i}" for i in range(peers)]  # bridge side; the namespace side is eth0
        self.made: list[tuple[str, str]] = []  # what to remove, recorded before it is created

    @staticmethod
    def peer_ip(i: int) -> str:
        return str(SUBNET.network_address + i + 2)

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]

    def __enter__(self) -> Testbed:
        try:
            with SIGNALS.shielded():
                self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        left = self.down()
        if left:
            print(f"wan: could not remove {', '.join(left)}; the next run removes them", file=sys.stderr)

    def up(self) -> None:
        self.made.append(("link", self.bridge))
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/{SUBNET.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, (ns, veth) in enumerate(zip(self.ns, self.veth, strict=True)):
            self.made.append(("netns", ns))
            sh("ip", "netns", "add", ns)
            self.made.append(("link", veth))
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge)
            sh("ip", "link", "set", veth, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.peer_ip(i)}/{SUBNET.prefixlen}", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._shape([], veth, "src")  # bridge side: what the peer downloads
            self._shape(["-n", ns], "eth0", "dst")  # namespace side: what the peer uploads

    def _shape(self, where: list[str], dev: str, direction: str) -> None:
        tc = ["tc", *where]
        if self.cap_coordinator:
            sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf_args(self.mbit))
            return
        # htb only sorts: class 1:10 (other peers, the default) goes through the tbf, 1:20 (the coordinator's
        # address) does not; neither htb class limits anything itself.
        sh(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
        for cls in ("1:10", "1:20"):
            sh(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", cls, "htb", "rate", UNCAPPED, "ceil",
               UNCAPPED, "burst", "1000000", "cburst", "1000000", "quantum", "60000")
        sh(*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", *tbf_args(self.mbit))
        sh(*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
           direction, f"{HOST_IP}/32", "flowid", "1:20")

    def down(self) -> list[str]:
        """Remove everything this testbed made (processes still in its namespaces included); returns leftovers."""
        with SIGNALS.shielded():
            namespaces = [name for kind, name in self.made if kind == "netns"]
            links = [name for kind, name in self.made if kind == "link"]
            existing_ns = set(list_namespaces())
            for ns in namespaces:
                if ns in existing_ns:
                    kill_namespace_processes(ns)
            existing_links = set(list_links())
            for link in reversed(links):  # veths (each takes its namespace end along), then the bridge
                if link in existing_links:
                    sh("ip", "link", "del", link, check=False)
            for ns in namespaces:
                if ns in existing_ns:
                    sh("ip", "netns", "del", ns, check=False)
            self.made.clear()
            return self.leftovers()

    def leftovers(self) -> list[str]:
        ours = set(self.ns) | set(self.veth) | {self.bridge}
        return sorted(ours & (set(list_namespaces()) | set(list_links())))

    # --- counters -----------------------------------------------------------------------------------------

    def link_bytes(self, i: int) -> tuple[int, int]:
        """(sent, received) bytes of peer i's eth0 (layer 2, everything)."""
        link = json.loads(sh("ip", "-n", self.ns[i], "-j", "-s", "link", "show", "dev", "eth0").stdout)[0]
        return link["stats64"]["tx"]["bytes"], link["stats64"]["rx"]["bytes"]

    def p2p_sent_bytes(self, i: int) -> int | None:
        """Bytes peer i sent to other peers (the capped htb class); None with --cap-coordinator."""
        if self.cap_coordinator:
            return None
        out = sh("tc", "-n", self.ns[i], "-s", "class", "show", "dev", "eth0").stdout
        m = re.search(r"class htb 1:10 .*?\n\s*Sent (\d+) bytes", out, re.DOTALL)
        return int(m.group(1)) if m else None


def _pid_is_wan(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        return b"wan.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def remove_stale() -> None:
    """Namespaces and links of earlier runs whose wan.py is gone (killed, crashed); refuses to touch a live one."""
    live = set()
    for ns in list_namespaces():
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-.*", ns)
        if not m:
            continue
        if _pid_is_wan(int(m.group(1))):
            live.add(int(m.group(1)))
            continue
        print(f"wan: removing namespace {ns} left over by an earlier run", file=sys.stderr)
        kill_namespace_processes(ns)
        sh("ip", "netns", "del", ns, check=False)
    for link in list_links():
        m = re.match(r"hfw[bv](\d+)", link)
        if not m:
            continue
        if _pid_is_wan(int(m.group(1))):
            live.add(int(m.group(1)))
            continue
        print(f"wan: removing link {link} left over by an earlier run", file=sys.stderr)
        sh("ip", "link", "del", link, check=False)
    live.discard(os.getpid())
    if live:
        raise SetupError(f"another wan.py (pid {', '.join(map(str, sorted(live)))}) is using the testbed's network; "
                         "wait for it to finish")
    for iface in json.loads(sh("ip", "-j", "-4", "addr", "show").stdout or "[]"):
        for a in iface.get("addr_info", []):
            if ipaddress.ip_address(a["local"]) in SUBNET:
                raise SetupError(f"{iface['ifname']} already has {a['local']}, inside the testbed's {SUBNET}")


def preflight(cap_coordinator: bool) -> None:
    """Root, iproute2, and a kernel that can make namespaces and the qdiscs this testbed uses."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (it makes network namespaces, veth pairs and qdiscs): run it with sudo")
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            missing.append(f"`{tool}` from iproute2 (Debian/Ubuntu: apt-get install iproute2)")
    if missing:
        raise SetupError("benchmarks/wan.py needs " + "; ".join(missing))
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        raise SetupError(f"`ip netns add` does not work here: {r.stderr.strip()}")
    try:
        sh("ip", "-n", probe, "link", "set", "lo", "up")
        tests = [["qdisc", "add", "dev", "lo", "root", "handle", "1:", *tbf_args(20)]]
        if not cap_coordinator:
            tests = [["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10"],
                     ["class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", UNCAPPED],
                     ["qdisc", "add", "dev", "lo", "parent", "1:10", "handle", "10:", *tbf_args(20)],
                     ["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
                      "ip", "dst", f"{HOST_IP}/32", "flowid", "1:10"]]
        for t in tests:
            r = sh("tc", "-n", probe, *t, check=False)
            if r.returncode != 0:
                raise SetupError(f"this kernel refused `tc {' '.join(t)}`: {r.stderr.strip()}"
                                 + ("" if cap_coordinator else " (--cap-coordinator needs tbf alone)"))
        for cmd in (["ip", "link", "add", f"hfwb{os.getpid()}", "type", "bridge"],
                    ["ip", "-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]):
            r = sh(*cmd, check=False)
            if r.returncode != 0:
                raise SetupError(f"this kernel refused `{' '.join(cmd)}`: {r.stderr.strip()}")
    finally:
        sh("ip", "link", "del", f"hfwb{os.getpid()}", check=False)
        sh("ip", "netns", "del", probe, check=False)


# --- the benchmark ----------------------------------------------------------------------------------------
