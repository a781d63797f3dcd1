"""``CoordinatorConfig``: every setting of a coordinator process, one CLI flag per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port


@dataclass(frozen=True)
class RunOptions:
    """Settings that define a new run. ``None`` means: the saved run's value when reopening a workdir,
    else the default below. An explicit value that differs from a saved run's is an error."""

    corpus: str | None = None  # 'stdlib' (default), a text file, a directory, or a .jsonl file
    model: str | None = None  # tiny (default) | small | base | L<layers>-H<heads>-D<width>
    seq_len: int | None = None  # tokens per sequence (default 128)
    micro_batch: int | None = None  # sequences per forward/backward on a peer (default 16)
    target_batch_size: int | None = None  # sequences per swarm optimizer step (default 256)
    lr: float | None = None  # peak learning rate (default 3e-3)
    warmup_steps: int | None = None  # swarm steps of warmup (default 10)
    decay_steps: int | None = None  # swarm steps of cosine decay (default 2000)
    shard_sequences: int | None = None  # sequences per work unit (default 256)
    seed: int | None = None  # init and data order (default 0)
    data_passes: int | None = None  # passes over the data before the run completes; 0 = endless (default)
    max_corpus_mb: float | None = None  # read at most this many MB of text; 0 = all (default)
    matchmaking_time: float | None = None  # hivemind all-reduce group gathering time, seconds (default 3)
    averaging_timeout: float | None = None  # hivemind all-reduce timeout, seconds (default 30)
    average_state_every: int | None = None  # swarm steps between parameter averaging rounds (default 5)

    DEFAULTS = dict(corpus="stdlib", model="tiny", seq_len=128, micro_batch=16, target_batch_size=256, lr=3e-3,
                    warmup_steps=10, decay_steps=2000, shard_sequences=256, seed=0, data_passes=0,
                    max_corpus_mb=0.0, matchmaking_time=3.0, averaging_timeout=30.0,
                    average_state_every=5)

    HELP = dict(
        seq_len="tokens per training sequence", micro_batch="sequences per forward/backward pass on a peer",
        target_batch_size="sequences the swarm accumulates per optimizer step", lr="peak learning rate (AdamW)",
        warmup_steps="swarm steps of linear warmup", decay_steps="swarm steps of cosine decay after warmup",
        shard_sequences="sequences per work unit", seed="model init and data order",
        data_passes="passes over the data before the run completes; 0 = endless",
        max_corpus_mb="read at most this many MB of text; 0 = all",
        matchmaking_time="seconds peers spend forming an all-reduce group (shorter: less overhead; longer: "
                         "sturdier on slow links)",
        averaging_timeout="seconds before an all-reduce round is abandoned",
        average_state_every="swarm steps between parameter averaging rounds")

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "target_batch_size", "shard_sequences", "decay_steps",
                     "average_state_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("warmup_steps", "data_passes", "seed", "max_corpus_mb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        for name in ("lr", "matchmaking_time", "averaging_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    def resolved(self, name: str):
        value = getattr(self, name)
        return self.DEFAULTS[name] if value is None else value


@dataclass(frozen=True)
class CoordinatorConfig:
    """A coordinator process."""

    workdir: Path  # holds the run: spec.json, ledger.sqlite, shards/, checkpoints/
    listen: str = "0.0.0.0:7600"  # gRPC address peers connect to
    http: str = "127.0.0.1:7680"  # status JSON at /api/status; '' turns it off
    dht_listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7601",)  # the bootstrap DHT node's listen multiaddrs
    dht_announce: tuple[str, ...] = ()  # multiaddrs to give peers instead of the visible ones (public IP, NAT)
    lease_seconds: float = 120.0  # a lease expires this long after the last heartbeat that extended it
    heartbeat_interval: float = 10.0  # how often peers are asked to heartbeat, seconds
    checkpoint_every: int = 10  # the keeper checkpoints every N swarm steps
    keep_checkpoints: int = 3  # older checkpoints are deleted
    keeper: bool = True  # run the keeper (checkpoints, validation loss, state for newcomers)
    keeper_poll: float = 2.0  # seconds between the keeper's looks at the swarm's step
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        parse_host_port(self.listen, flag="--listen")
        if self.http:
            parse_host_port(self.http, flag="--http")
        if self.lease_seconds <= self.heartbeat_interval:
            raise ConfigError(f"--lease-seconds ({self.lease_seconds}) must exceed --heartbeat-interval "
                              f"({self.heartbeat_interval}), or leases expire while peers are healthy")
        if self.heartbeat_interval <= 0:
            raise ConfigError("--heartbeat-interval must be > 0")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("--checkpoint-every and --keep-checkpoints must be >= 1")
        for maddr in (*self.dht_listen, *self.dht_announce):
            if not maddr.startswith("/"):
                raise ConfigError(f"DHT address {maddr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/7601)")
