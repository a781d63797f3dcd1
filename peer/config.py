"""``PeerConfig``: every setting of a peer process, one CLI flag per field."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port

DEVICES = ("auto", "cpu", "cuda", "mps")


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

    def __post_init__(self) -> None:
        parse_host_port(self.coordinator, flag="--coordinator")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.name.strip() or len(self.name) > 64 or not self.name.isprintable():
            raise ConfigError(f"--name must be 1-64 printable characters, got {self.name!r}")
        if self.threads < 0 or self.max_shards < 0:
            raise ConfigError("--threads and --max-shards must be >= 0")
        if self.retry_cap <= 0:
            raise ConfigError("--retry-cap must be > 0")
        if self.step_interval < 0:
            raise ConfigError("--step-interval must be >= 0")
        for maddr in (*self.dht_listen, *self.dht_announce):
            if not maddr.startswith("/"):
                raise ConfigError(f"DHT address {maddr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/0)")
