"""``PeerConfig``: every setting of a peer process, one CLI flag per field, and the flags.

Light on purpose: ``hivefold --help`` and ``hivefold status`` build the parser from here, so this
module must not import torch, hivemind or numpy.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port
from hivefold.tls import add_trust_arguments, trust_from_args

DEVICES = ("auto", "cpu", "cuda", "mps")
MICRO_BATCH_MAX = 65536  # the largest micro-batch a coordinator records (coordinator.handlers)
IDLE_SHARE_DEFAULT = 0.25  # --idle-only without a value: other processes may use a quarter of the CPU


@dataclass(frozen=True)
class PeerConfig:
    """A volunteer peer process."""

    coordinator: str  # HOST:PORT of the coordinator's gRPC service
    coordinator_fingerprint: str | None = None  # pin the coordinator's certificate (SHA-256); None: system / TOFU
    insecure: bool = False  # plaintext gRPC to the coordinator (loopback development)
    workdir: Path = Path("~/.hivefold/peer").expanduser()  # identity key, shard cache, unsent results
    name: str = socket.gethostname()[:64] or "peer"  # display name shown to watchers
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    dht_listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)  # where this peer's DHT node listens
    dht_announce: tuple[str, ...] = ()  # public multiaddrs to announce (behind NAT with port forwarding)
    client_mode: bool = False  # behind NAT without forwarding: reach others, accept no connections
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    max_shards: int = 0  # leave after this many shards; 0 = until stopped or the run completes
    progress: bool = True  # show a progress bar (off: one log line per shard)
    retry_cap: float = 30.0  # longest wait between retries when the coordinator is unreachable
    step_interval: float = 1.0  # seconds of local gradient accumulation per hivemind step call (less DHT chatter)
    micro_batch: int = 0  # sequences per forward/backward; 0 = auto (the run's on CPU, sized to the GPU on CUDA)
    team: str = ""  # the team this volunteer's points count for on the leaderboard; "" = none
    invite: str = ""  # an invite to an invite-only run (needed at the first registration only)
    metrics_port: str = ""  # PORT or HOST:PORT serving this peer's Prometheus /metrics; "" = off
    max_hours: float = 0.0  # finish the current shard and leave after this many hours of training; 0 = no limit
    gpu_memory_fraction: float | None = None  # share of the GPU's memory this process may take; None = no limit
    idle_only: float | None = None  # pause while other processes use more than this share of the CPU; None = off
    upload_cap: int = 0  # bytes this peer may send per UTC day, then it pauses until the next; 0 = no cap

    @property
    def trust(self):
        from hivefold.tls import Trust
        return Trust(fingerprint=self.coordinator_fingerprint, insecure=self.insecure)

    def __post_init__(self) -> None:
        parse_host_port(self.coordinator, flag="--coordinator")
        _ = self.trust  # checks the trust flags together
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.name.strip() or len(self.name) > 64 or not self.name.isprintable():
            raise ConfigError(f"--name must be 1-64 printable characters, got {self.name!r}")
        if len(self.team) > 32 or not self.team.isprintable():
            raise ConfigError(f"--team must be at most 32 printable characters, got {self.team!r}")
        if self.threads < 0 or self.max_shards < 0:
            raise ConfigError("--threads and --max-shards must be >= 0")
        if self.retry_cap <= 0:
            raise ConfigError("--retry-cap must be > 0")
        if self.micro_batch > MICRO_BATCH_MAX:
            raise ConfigError(f"--micro-batch must be at most {MICRO_BATCH_MAX}, got {self.micro_batch}")
        if self.micro_batch < 0:
            raise ConfigError(f"--micro-batch must be 'auto' or a positive number of sequences, got {self.micro_batch}")
        if self.step_interval < 0:
            raise ConfigError("--step-interval must be >= 0")
        if self.metrics_port:
            parse_host_port(self.metrics_port if ":" in self.metrics_port else f"0.0.0.0:{self.metrics_port}",
                            flag="--metrics-port")
        if not math.isfinite(self.max_hours) or self.max_hours < 0:
            raise ConfigError(f"--max-hours must be a number of hours >= 0 (0: no limit), got {self.max_hours}")
        if self.gpu_memory_fraction is not None and not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"--gpu-memory-fraction must be in (0, 1], e.g. 0.5 for half the GPU's memory, got "
                              f"{self.gpu_memory_fraction}")
        if self.idle_only is not None and not 0 < self.idle_only < 1:
            raise ConfigError(f"--idle-only SHARE must be between 0 and 1 (the share of the CPU other processes may "
                              f"use before this peer pauses; default {IDLE_SHARE_DEFAULT}), got {self.idle_only}")
        if self.upload_cap < 0:
            raise ConfigError(f"--upload-cap must be >= 0 bytes (0: no cap), got {self.upload_cap}")
        for maddr in (*self.dht_listen, *self.dht_announce):
            if not maddr.startswith("/"):
                raise ConfigError(f"DHT address {maddr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hivefold peer`` flags: one per ``PeerConfig`` field."""
    d = PeerConfig(coordinator="localhost:7600")
    p.add_argument("--coordinator", help="coordinator gRPC HOST:PORT; required to run a peer (no default)")
    add_trust_arguments(p)
    p.add_argument("--workdir", type=Path, default=d.workdir,
                   help="identity, shard cache, unsent results (default %(default)s)")
    p.add_argument("--name", default=d.name, help="display name shown to watchers (default: this host's name, "
                   "%(default)s)")
    p.add_argument("--device", default=d.device,
                   help="auto | cpu | cuda | mps; auto picks cuda, then mps, then cpu (default %(default)s)")
    p.add_argument("--dht-listen", action="append",
                   help=f"DHT listen multiaddr, repeatable (default {' '.join(d.dht_listen)})")
    p.add_argument("--dht-announce", action="append",
                   help="public multiaddr to announce, repeatable (default: the visible ones)")
    p.add_argument("--client-mode", action="store_true", help="behind NAT: connect out only")
    p.add_argument("--team", default=d.team, help="team your points count for on the leaderboard (default: none)")
    p.add_argument("--invite", default=d.invite, metavar="TOKEN",
                   help="the invite the run's operator gave you, for an invite-only run (needed once: the peer keeps "
                        "its place afterwards) (default: none)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; 0 = torch's default (default %(default)s)")
    p.add_argument("--max-shards", type=int, default=d.max_shards,
                   help="leave after N shards; 0 = no limit (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--retry-cap", type=float, default=d.retry_cap,
                   help="longest wait between retries while the coordinator is unreachable, seconds "
                        "(default %(default)s)")
    p.add_argument("--micro-batch", type=_micro_batch, default="auto",
                   help="sequences per forward/backward pass: auto (the run's on a CPU; on a GPU, the size that "
                        "keeps it busy within its memory) or a number (default auto)")
    p.add_argument("--step-interval", type=float, default=d.step_interval,
                   help="seconds of local gradient accumulation between hivemind steps (default %(default)s)")
    p.add_argument("--metrics-port", default="", metavar="[HOST:]PORT",
                   help="serve this peer's Prometheus metrics at http://HOST:PORT/metrics (a bare port listens on "
                        "every interface); off by default")
    p.add_argument("--max-hours", type=float, default=d.max_hours, metavar="H",
                   help="after H hours of training (paused time does not count), finish the current shard and "
                        "leave; 0 = no limit (default %(default)s)")
    p.add_argument("--gpu-memory-fraction", type=float, metavar="F",
                   help="let this peer take at most this share (0 < F <= 1) of the GPU's memory; ignored on a CPU "
                        "(default: no limit)")
    p.add_argument("--idle-only", type=float, nargs="?", const=IDLE_SHARE_DEFAULT, metavar="SHARE",
                   help="train only while the machine is otherwise idle: pause while other processes use more than "
                        f"SHARE of its CPU (default when given without a value: {IDLE_SHARE_DEFAULT}; default: off)")
    p.add_argument("--upload-cap", type=_byte_size, default=0, metavar="BYTES",
                   help="bytes this peer may send per UTC day, e.g. 500M or 2G (counted: results and heartbeats, "
                        "and in diloco the all-reduce's estimated payload); once reached it finishes its shard and "
                        "pauses until the next day; 0 = no cap (default 0)")


def _micro_batch(text: str) -> int:
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of sequences, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or >= 1, got {value}")
    return value


CONTROL_HELP = {
    "pause": "stop training at the next micro-batch and stay online; leases held longer than they last without "
             "this peer are handed back",
    "resume": "continue training (leasing afresh if the pause handed the leases back)",
    "finish": "complete and submit the current shard, hand back any fetched ahead, leave the swarm and exit 0",
}


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    """``hivefold peer pause|resume|finish [--workdir DIR]``: commands to the peer running in DIR.

    Optional subcommands, so ``hivefold peer --coordinator ...`` runs a peer exactly as before.
    """
    d = PeerConfig(coordinator="localhost:7600")
    sub = p.add_subparsers(dest="peer_command", metavar="{pause,resume,finish}",
                           help="control the peer running in --workdir (default: none, run a peer)")
    for command, text in CONTROL_HELP.items():
        c = sub.add_parser(command, help=text, description=f"{text[0].upper()}{text[1:]}.")
        c.add_argument("--workdir", type=Path, default=argparse.SUPPRESS,
                       help=f"the running peer's --workdir (default {d.workdir})")


_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgt]i?)?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_byte_size(text: str) -> int:
    """``500M`` → 500_000_000, ``2G`` → 2_000_000_000, ``1.5Gi`` → 1.5 * 2**30, ``100kB``, ``4096``.

    K, M, G, T are powers of 1000 and Ki, Mi, Gi, Ti powers of 1024; a trailing ``B`` is optional.
    Raises ValueError with a message that shows the accepted forms.
    """
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected a number of bytes like 500M, 2G or 1.5Gi (K, M, G, T: powers of 1000; "
                         f"Ki, Mi, Gi, Ti: powers of 1024), got {text!r}")
    return int(float(m["number"]) * _UNITS[(m["unit"] or "").lower()])


def _byte_size(text: str) -> int:
    try:
        return parse_byte_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    """Validate the parsed flags; raises ConfigError (exit 2)."""
    trust = trust_from_args(args)
    return PeerConfig(coordinator=args.coordinator, coordinator_fingerprint=trust.fingerprint,
                      insecure=trust.insecure, workdir=args.workdir.expanduser(), name=args.name,
                      device=args.device, dht_listen=tuple(args.dht_listen or PeerConfig.dht_listen),
                      dht_announce=tuple(args.dht_announce or ()), client_mode=args.client_mode,
                      threads=args.threads, max_shards=args.max_shards, progress=not args.no_progress,
                      retry_cap=args.retry_cap, step_interval=args.step_interval, micro_batch=args.micro_batch,
                      metrics_port=args.metrics_port, team=args.team.strip(), invite=args.invite.strip(),
                      max_hours=args.max_hours,
                      gpu_memory_fraction=args.gpu_memory_fraction, idle_only=args.idle_only,
                      upload_cap=args.upload_cap)
