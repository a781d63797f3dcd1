"""The checks of ``hivefold doctor`` that start something on this machine: the libp2p daemon starts,
the swarm's DHT can be joined, others can connect to this machine, the device trains.

hivemind 1.1.12 has no dial-back service that would tell a machine whether the internet can reach
it, and doctor adds none to the swarm. So reachability is judged from here: the addresses libp2p
sees for this machine (interfaces, UPnP mappings, addresses other peers observed) must include one
of the swarm's scope (public for a swarm on the internet, private for one on a LAN, any for one on
this machine), and a second, fresh daemon must be able to open a connection to it. A firewall
upstream of this machine cannot be seen this way; the advice says what to do if peers still fail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable

from hivefold.errors import ConfigError
from peer.doctor import FAIL, PASS, SKIP, WARN, Check

DEVICE_BATCH, DEVICE_SEQ = 8, 128  # the device check's micro-batch: sequences x tokens
LISTEN = "/ip4/0.0.0.0/tcp/0"  # a peer's default --dht-listen
SCOPES = ("loopback", "private", "public")  # narrowest first
CLIENT_MODE_ADVICE = ("run the peer with --client-mode (it then only connects out), or forward a TCP port to this "
                      "machine and pass --dht-listen /ip4/0.0.0.0/tcp/PORT --dht-announce /ip4/<public ip>/tcp/PORT")


def scope(maddr: str) -> str:
    """``loopback``, ``private`` (LAN, carrier-grade NAT, link-local) or ``public`` (DNS names count as public)."""
    parts = maddr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return "public"
    ip = ipaddress.ip_address(parts[2])
    return "loopback" if ip.is_loopback else "public" if ip.is_global else "private"


def _host(maddr: str) -> str:
    return maddr.split("/")[2] if maddr.count("/") >= 2 else maddr


def network_checks(status: dict | None, timeout: float, report: Callable[[Check], None], *, asked: bool) -> None:
    """The daemon, DHT bootstrap and reachability checks, reported as they finish; ``status``: the coordinator's
    status document, None when ``asked`` is False (no --coordinator) or the coordinator did not answer."""
    try:
        asyncio.run(_checks(status, timeout, report, asked))
    except Exception as e:  # noqa: BLE001 - a broken check must not hide the device check
        report(Check("libp2p", FAIL, f"{type(e).__name__}: {e}", "unexpected: please report this line"))


async def _checks(status: dict | None, timeout: float, report: Callable[[Check], None], asked: bool) -> None:
    from hivemind.p2p import P2P

    t0 = time.perf_counter()
    try:
        server = await P2P.create(host_maddrs=[LISTEN], startup_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - P2PDaemonError, or an OSError starting it
        report(Check("p2p-daemon", FAIL, f"the libp2p daemon did not start: {e}", _daemon_advice()))
        for name in ("dht-bootstrap", "reachability"):
            report(Check(name, SKIP, "needs the libp2p daemon"))
        return
    took = time.perf_counter() - t0
    slow = took > timeout / 2
    report(Check("p2p-daemon", WARN if slow else PASS, f"the libp2p daemon started in {took:.1f} s",
                 _daemon_advice() if slow else "", seconds=took))
    started = [server]
    try:
        initial = list((status or {}).get("dht_initial_peers") or [])
        prober = None
        if status is None:
            report(Check("dht-bootstrap", SKIP, "needs the coordinator's answer" if asked
                         else "no --coordinator given"))
        elif not initial:
            report(Check("dht-bootstrap", WARN, "the coordinator does not publish its DHT bootstrap addresses "
                         "(an older hivefold)", "update the coordinator's hivefold to have this checked"))
        else:
            t0 = time.perf_counter()
            # As a client, and only as far as libp2p: the swarm's DHT answers token holders only (registered
            # peers; hivefold.swarm_access), so connecting to the bootstrap node is what can be tested here.
            try:
                p2p = await P2P.create(initial_peers=initial, dht_mode="client", host_maddrs=[LISTEN],
                                       startup_timeout=timeout)
                started.append(p2p)
            except Exception as e:  # noqa: BLE001 - P2PDaemonError (bootstrap failed), RuntimeError (no answer)
                why = "no bootstrap address accepted a connection" if "connect to bootstrap" in str(e) else str(e)
                report(Check("dht-bootstrap", FAIL, f"cannot join the swarm's DHT at {' '.join(initial)}: {why}",
                             _bootstrap_advice(initial)))
            else:
                prober = p2p
                took = time.perf_counter() - t0
                report(Check("dht-bootstrap", PASS, f"connected to the swarm's DHT bootstrap node in {took:.1f} s via "
                             f"{len(initial)} address{'es' * (len(initial) != 1)}", seconds=took))
        if prober is None:  # a fresh daemon of its own to dial this machine with
            prober = await P2P.create(dht_mode="client", host_maddrs=[LISTEN], startup_timeout=timeout)
            started.append(prober)
        report(await _reachability(server, prober, initial, timeout))
    finally:
        for item in reversed(started):
            await item.shutdown()


async def _reachability(server, prober, initial: list[str], timeout: float) -> Check:
    from hivemind.utils.multiaddr import Multiaddr

    swarm = max((scope(m) for m in initial), key=SCOPES.index, default="public")
    own = [str(m).partition("/p2p/")[0] for m in await server.get_visible_maddrs(latest=True)]
    own = [m for m in own if "p2p-circuit" not in m]
    usable = [m for m in own if SCOPES.index(scope(m)) >= SCOPES.index(swarm)]
    where = {"loopback": "on this machine", "private": "on the local network", "public": "on the internet"}[swarm]
    if not usable:
        hosts = ", ".join(sorted({_host(m) for m in own if scope(m) != "loopback"})) or "loopback only"
        return Check("reachability", WARN, f"not reachable from outside: a swarm {where}"
                     f"{'' if initial else ' (assumed)'} needs a {swarm} address, this machine has {hosts}",
                     CLIENT_MODE_ADVICE)
    try:  # a fresh connection from another daemon, to exactly these addresses
        await asyncio.wait_for(prober._client.connect(server.peer_id, [Multiaddr(m) for m in usable]), timeout)
    except Exception as e:  # noqa: BLE001 - any failure to connect means: not reachable
        return Check("reachability", WARN, f"not reachable from outside: a fresh connection to {' '.join(usable)} "
                     f"failed ({type(e).__name__}: {e})", CLIENT_MODE_ADVICE)
    caveat = " (a firewall upstream is not visible from here: if peers cannot connect, use --client-mode)"
    return Check("reachability", PASS, f"reachable {where} at {' '.join(usable[:3])}: run normally"
                 + (caveat if swarm == "public" else ""))


def _daemon_advice() -> str:
    from importlib import util
    from pathlib import Path

    spec = util.find_spec("hivemind")
    p2pd = Path(spec.submodule_search_locations[0]) / "hivemind_cli" / "p2pd" if spec else "hivemind_cli/p2pd"
    return (f"check free space in /tmp (its sockets live there: df -h /tmp), that {p2pd} exists and is executable "
            "(else: pip install --force-reinstall hivemind==1.1.12), and that no firewall or security tool blocks it")


def _bootstrap_advice(initial: list[str]) -> str:
    scopes = {scope(m) for m in initial}
    ports = sorted({m.split("/")[4] for m in initial if m.count("/") >= 4})
    advice = (f"the coordinator's DHT port ({', '.join(ports)}, its --dht-listen) must accept TCP from this machine: "
              "check its firewall and this network's")
    if scopes == {"loopback"}:
        advice += ("; these are loopback addresses: unless the coordinator runs on this machine, it must listen on a "
                   "reachable interface (--dht-listen /ip4/0.0.0.0/tcp/PORT) and announce its address (--dht-announce)")
    elif "public" not in scopes:
        advice += ("; these are private addresses: from outside their network, the coordinator must --dht-announce "
                   "a public one")
    return advice


# --- the device -------------------------------------------------------------------------------------


def check_device(requested: str) -> Check:
    """A few forward/backward passes of the tiny model on the device a peer would pick, timed."""
    import torch

    from hivefold.model import build_model
    from hivefold.spec import MODEL_PRESETS, ModelConfig
    from hivefold.training import autocast
    from peer.device import describe_device, resolve_device

    try:
        device = resolve_device(requested)
    except ConfigError as e:
        if requested != "cuda":
            return Check("device", FAIL, str(e), "pick another --device (auto takes what is there)")
        if torch.version.cuda is None:
            return Check("device", FAIL, f"CUDA requested, but torch {torch.__version__} is a CPU-only build",
                         "install a CUDA build of torch: rm -rf .venv && make TORCH=torch venv, or pip install "
                         "--force-reinstall torch --index-url https://download.pytorch.org/whl/cu126 (a CUDA version "
                         "your driver supports: see nvidia-smi)")
        return Check("device", FAIL, f"CUDA requested, but torch {torch.__version__} (CUDA {torch.version.cuda}) "
                     "sees no GPU", "check that nvidia-smi lists the GPU, that the driver supports CUDA "
                     f"{torch.version.cuda}, and that CUDA_VISIBLE_DEVICES does not hide it")
    cfg = ModelConfig(**MODEL_PRESETS["tiny"], max_seq_len=DEVICE_SEQ)
    model = build_model(cfg, seed=0).to(device)
    x = torch.randint(0, cfg.vocab_size, (DEVICE_BATCH, DEVICE_SEQ + 1), device=device)

    def step() -> float:
        with autocast(device):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        return float(loss.detach())  # waits for the device

    for _ in range(2):  # warm-up: kernels chosen, memory allocated, threads started
        step()
    t0, n, loss = time.perf_counter(), 0, 0.0
    while n < 3 or (time.perf_counter() - t0 < 1.0 and n < 50):
        loss, n = step(), n + 1
    rate = n * DEVICE_BATCH / (time.perf_counter() - t0)
    if not math.isfinite(loss):
        return Check("device", FAIL, f"{device}: the tiny model's loss is {loss}",
                     "this device computes wrong results; try --device cpu and report the device")
    return Check("device", PASS, f"{device} ({describe_device(device).name}): tiny model forward/backward at "
                 f"{rate:.0f} samples/s of {DEVICE_SEQ} tokens")
