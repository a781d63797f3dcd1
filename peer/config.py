"""``PeerConfig``: every setting of a peer process, one CLI flag per field, and the flags.

Light on purpose: ``hivefold --help`` and ``hivefold status`` build the parser from here, so this
module must not import torch, hivemind or numpy.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port

DEVICES = ("auto", "cpu", "cuda", "mps")
MICRO_BATCH_MAX = 65536  # the largest micro-batch a coordinator records (coordinator.handlers)


@dataclass(frozen=True)
class PeerConfig:
    """A volunteer peer process."""

    coordinator: str  # HOST:PORT of the coordinator's gRPC service
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
    metrics_port: str = ""  # PORT or HOST:PORT serving this peer's Prometheus /metrics; "" = off

    def __post_init__(self) -> None:
        parse_host_port(self.coordinator, flag="--coordinator")
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
        for maddr in (*self.dht_listen, *self.dht_announce):
            if not maddr.startswith("/"):
                raise ConfigError(f"DHT address {maddr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/0)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hivefold peer`` flags: one per ``PeerConfig`` field."""
    d = PeerConfig(coordinator="localhost:7600")
    p.add_argument("--coordinator", required=True, help="coordinator gRPC HOST:PORT")
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


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    """Validate the parsed flags; raises ConfigError (exit 2)."""
    return PeerConfig(coordinator=args.coordinator, workdir=args.workdir.expanduser(), name=args.name,
                      device=args.device, dht_listen=tuple(args.dht_listen or PeerConfig.dht_listen),
                      dht_announce=tuple(args.dht_announce or ()), client_mode=args.client_mode,
                      threads=args.threads, max_shards=args.max_shards, progress=not args.no_progress,
                      retry_cap=args.retry_cap, step_interval=args.step_interval, micro_batch=args.micro_batch,
                      metrics_port=args.metrics_port, team=args.team.strip())
