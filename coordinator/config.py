"""``CoordinatorConfig``: every setting of a coordinator process, one CLI flag per field, and the flags.

Light on purpose: ``hivefold --help`` and ``hivefold status`` build the parser from here, so this
module must not import torch, hivemind or numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port
from hivefold.spec import AVERAGING_MODES, COMPRESSIONS, model_config_from_name

# A peer unheard of for this many heartbeats, and at least SILENT_FLOOR_S, is taken for gone: its leases expire (its
# shards go back to the pool in about a minute, not at a deadline sized for its work); a result it still sends is
# taken if nobody else's came first. The floor: a live peer's heartbeat thread may spend a few seconds per beat
# linking to members (hivefold.addressbook) and asking for time, and short test intervals would take it for gone.
SILENT_HEARTBEATS = 6
SILENT_FLOOR_S = 60.0
MAX_PROOF_SEGMENTS = 64  # --proof-segments at most (state changes cut a shard's segments further: hivefold.proof)


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
    averaging: str | None = None  # sync | diloco (default diloco)
    inner_steps: int | None = None  # diloco: micro-batches the swarm trains per outer round (default 100)
    outer_lr: float | None = None  # diloco: outer Nesterov learning rate (default 0.7)
    outer_momentum: float | None = None  # diloco: outer Nesterov momentum (default 0.9)
    compression: str | None = None  # fp32 | fp16 | int8 | int4 values in the all-reduce (default fp32)

    DEFAULTS = dict(corpus="stdlib", model="tiny", seq_len=128, micro_batch=16, target_batch_size=256, lr=3e-3,
                    warmup_steps=10, decay_steps=2000, shard_sequences=256, seed=0, data_passes=0,
                    max_corpus_mb=0.0, matchmaking_time=3.0, averaging_timeout=30.0,
                    average_state_every=5, averaging="diloco", inner_steps=100, outer_lr=0.7, outer_momentum=0.9,
                    compression="fp32")

    HELP = dict(
        corpus="'stdlib', a text file, a directory of text files, or a .jsonl file with a \"text\" field",
        model="tiny | small | base | L<layers>-H<heads>-D<width>",
        seq_len="tokens per training sequence", micro_batch="sequences per forward/backward pass on a peer",
        target_batch_size="sequences the swarm accumulates per optimizer step", lr="peak learning rate (AdamW)",
        warmup_steps="swarm steps of linear warmup", decay_steps="swarm steps of cosine decay after warmup",
        shard_sequences="sequences per work unit", seed="model init and data order",
        data_passes="passes over the data before the run completes; 0 = endless",
        max_corpus_mb="read at most this many MB of text; 0 = all",
        matchmaking_time="seconds peers spend forming an all-reduce group (shorter: less overhead; longer: "
                         "sturdier on slow links)",
        averaging_timeout="seconds before an all-reduce round is abandoned",
        average_state_every="sync: swarm steps between parameter averaging rounds",
        averaging="sync: all-reduce gradients every swarm step (target batch); diloco: each peer trains locally "
                  "with AdamW, the swarm all-reduces the change every --inner-steps and takes an outer Nesterov step",
        inner_steps="diloco: micro-batches (of --micro-batch) the whole swarm trains per outer round",
        outer_lr="diloco: outer Nesterov SGD learning rate", outer_momentum="diloco: outer Nesterov momentum",
        compression="fp32 | fp16 | int8 | int4: values on the wire in each all-reduce (int4: 4.25 bits a value, "
                    "for slow links)")

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "target_batch_size", "shard_sequences", "decay_steps",
                     "average_state_every", "inner_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("warmup_steps", "data_passes", "seed", "max_corpus_mb"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        for name in ("lr", "matchmaking_time", "averaging_timeout", "outer_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name, allowed in (("averaging", AVERAGING_MODES), ("compression", COMPRESSIONS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.outer_momentum is not None and not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"--outer-momentum must be in [0, 1), got {self.outer_momentum}")
        if self.seq_len == 1:
            raise ConfigError("--seq-len must be >= 2: each token of a sequence learns to predict the next")
        if self.model is not None:
            try:  # only the dims are checked here; the vocabulary comes from the tokenizer later
                model_config_from_name(self.model, vocab_size=1, max_seq_len=self.resolved("seq_len"))
            except ConfigError as e:
                raise ConfigError(f"--model {self.model}: {e}") from None
        # Relations are checked between explicit values only: None may stand for a saved run's value.
        # ``with_defaults`` checks them again for a new run.
        if self.micro_batch is not None and self.target_batch_size is not None \
                and self.micro_batch > self.target_batch_size:
            raise ConfigError(f"--micro-batch ({self.micro_batch}) must be <= --target-batch-size "
                              f"({self.target_batch_size}): the swarm steps once per target batch")

    def resolved(self, name: str):
        value = getattr(self, name)
        return self.DEFAULTS[name] if value is None else value

    def with_defaults(self) -> RunOptions:
        """Every unset option filled in with its default, as a new run uses them (validated together)."""
        return dataclasses.replace(self, **{name: self.resolved(name) for name in self.DEFAULTS})


@dataclass(frozen=True)
class CoordinatorConfig:
    """A coordinator process."""

    workdir: Path  # holds the run: spec.json, ledger.sqlite, shards/, checkpoints/
    listen: str = "0.0.0.0:7600"  # gRPC address peers connect to
    http: str = "127.0.0.1:7680"  # status JSON at /api/status; '' turns it off
    dht_listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/7601",)  # the bootstrap DHT node's listen multiaddrs
    dht_announce: tuple[str, ...] = ()  # multiaddrs to give peers instead of the visible ones (public IP, NAT)
    lease_seconds: float = 120.0  # the shortest lease, and the lease of a peer whose throughput is not known yet
    lease_max_seconds: float = 4 * 3600.0  # the longest a lease may live, extensions included
    heartbeat_interval: float = 10.0  # how often peers are asked to heartbeat, seconds
    checkpoint_every: int = 10  # the keeper checkpoints every N swarm steps
    keep_checkpoints: int = 3  # older checkpoints are deleted
    keeper: bool = True  # run the keeper (checkpoints, validation loss, state for newcomers)
    keeper_poll: float = 2.0  # seconds between the keeper's looks at the swarm's step
    token_budget: int = 0  # the run is complete once this many tokens are trained (accepted); 0 = no budget
    qrb_k: float = 0.75  # quick-return bonus: points = base x max(1, sqrt(k x deadline / elapsed)); 0 = off
    ledger: str = ""  # an SQLite file path or a postgresql:// URL; '' = ledger.sqlite in the workdir
    invite_only: bool = False  # new peers must redeem an invite (hivefold coordinator invite)
    rpc_rate: float = 100.0  # requests a second each peer (or, before it signs in, each address) may send
    swarm_token_seconds: float = 600.0  # a peer's swarm access token lives this long (a banned peer's is not renewed)
    ban_after_reports: int = 2  # distinct peers that must catch a member poisoning the averaging to ban it; 0 = never
    verify_floor: float = 0.05  # the least share of a trusted peer's results checked by the keeper
    verify_ceiling: float = 1.0  # the share of a new peer's results checked; 0 = no verification
    verify_tolerance: float = 0.02  # the largest relative difference between a reported and a replayed loss
    proof_segments: int = 4  # proof-of-training segments per shard (one is replayed when a result is checked)
    ban_after_invalid: int = 2  # results failing verification that ban a peer; 0 = never
    insecure: bool = False  # plaintext gRPC and HTTP (loopback development); default TLS
    tls_cert: Path | None = None  # the operator's certificate (PEM, chain included); None = self-signed in workdir
    tls_key: Path | None = None  # its private key (PEM, unencrypted)
    run: RunOptions = field(default_factory=RunOptions)

    @property
    def silent_seconds(self) -> float:
        """A peer unheard of this long loses its leases (``SILENT_HEARTBEATS``, ``SILENT_FLOOR_S``)."""
        return max(SILENT_HEARTBEATS * self.heartbeat_interval, SILENT_FLOOR_S)

    def __post_init__(self) -> None:
        parse_host_port(self.listen, flag="--listen")
        if self.http:
            parse_host_port(self.http, flag="--http")
        if self.lease_seconds <= self.heartbeat_interval:
            raise ConfigError(f"--lease-seconds ({self.lease_seconds}) must exceed --heartbeat-interval "
                              f"({self.heartbeat_interval}), or leases expire while peers are healthy")
        if self.lease_max_seconds < self.lease_seconds:
            raise ConfigError(f"--lease-max-seconds ({self.lease_max_seconds}) must be >= --lease-seconds "
                              f"({self.lease_seconds})")
        if self.heartbeat_interval <= 0:
            raise ConfigError("--heartbeat-interval must be > 0")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("--checkpoint-every and --keep-checkpoints must be >= 1")
        for maddr in (*self.dht_listen, *self.dht_announce):
            if not maddr.startswith("/"):
                raise ConfigError(f"DHT address {maddr!r} is not a multiaddr (e.g. /ip4/0.0.0.0/tcp/7601)")
        if self.token_budget < 0:
            raise ConfigError(f"--token-budget must be >= 0 tokens (0 = none), got {self.token_budget}")
        if "://" in self.ledger and not self.ledger.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"--ledger takes an SQLite file path or a postgresql:// URL, got "
                              f"{self.ledger.split('://')[0]}://...")
        if not 0.1 <= self.rpc_rate <= 1e6:
            raise ConfigError(f"--rpc-rate must be between 0.1 and 1e6 requests a second, got {self.rpc_rate}")
        if not 10 <= self.swarm_token_seconds <= 86400:
            raise ConfigError(f"--swarm-token-seconds must be between 10 and 86400, got {self.swarm_token_seconds}")
        if self.swarm_token_seconds < 3 * self.heartbeat_interval:  # peers renew past half-life, at a heartbeat
            raise ConfigError(f"--swarm-token-seconds ({self.swarm_token_seconds:g}) must be at least 3 × "
                              f"--heartbeat-interval ({self.heartbeat_interval:g}): peers renew their token at a "
                              "heartbeat past its half-life, and would drop out of the swarm meanwhile")
        if not 0 <= self.ban_after_reports <= 1000:
            raise ConfigError(f"--ban-after-reports must be between 0 (never ban) and 1000, "
                              f"got {self.ban_after_reports}")
        if not 0 <= self.verify_ceiling <= 1 or not 0 <= self.verify_floor <= (self.verify_ceiling or 1):
            raise ConfigError(f"need 0 <= --verify-floor ({self.verify_floor}) <= --verify-ceiling "
                              f"({self.verify_ceiling}) <= 1 (a ceiling of 0 turns checks off)")
        if not 1e-6 <= self.verify_tolerance <= 1:
            raise ConfigError(f"--verify-tolerance must be between 1e-6 and 1 (relative), got {self.verify_tolerance}")
        if not 1 <= self.proof_segments <= MAX_PROOF_SEGMENTS:
            raise ConfigError(f"--proof-segments must be between 1 and {MAX_PROOF_SEGMENTS}, got {self.proof_segments}")
        if not 0 <= self.ban_after_invalid <= 1000:
            raise ConfigError(f"--ban-after-invalid must be between 0 (never ban) and 1000, got "
                              f"{self.ban_after_invalid}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both, or neither for a self-signed "
                              "certificate made in the workdir")
        if self.insecure and self.tls_cert is not None:
            raise ConfigError("--insecure and --tls-cert contradict each other: pick one")
        if not 0 <= self.qrb_k <= 100 or self.qrb_k != self.qrb_k:
            raise ConfigError(f"--qrb-k must be between 0 (no bonus) and 100, got {self.qrb_k}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``hivefold coordinator`` flags: one per field of ``CoordinatorConfig`` and ``RunOptions``."""
    d = CoordinatorConfig(workdir=Path("."))
    # required unless a subcommand (hivefold coordinator invite|ban|unban) takes its own
    p.add_argument("--workdir", type=Path,
                   help="directory holding the run, created if missing (default: none; required to run a coordinator)")
    p.add_argument("--listen", default=d.listen, help="gRPC HOST:PORT for peers (default %(default)s)")
    p.add_argument("--http", default=d.http, help="HOST:PORT for /api/status; '' disables (default %(default)s)")
    p.add_argument("--dht-listen", action="append",
                   help=f"DHT listen multiaddr, repeatable (default {' '.join(d.dht_listen)})")
    p.add_argument("--dht-announce", action="append",
                   help="multiaddr given to peers instead of the visible ones, repeatable (default: the visible ones)")
    p.add_argument("--lease-seconds", type=float, default=d.lease_seconds,
                   help="the shortest lease: leases are sized to the shard's work at the peer's throughput, 3x over, "
                        "never shorter than this (nor, for a peer not measured yet, longer) (default %(default)s)")
    p.add_argument("--lease-max-seconds", type=float, default=d.lease_max_seconds,
                   help="the longest a lease may live, the extensions a slow peer asks for included "
                        "(default %(default)s)")
    p.add_argument("--heartbeat-interval", type=float, default=d.heartbeat_interval,
                   help="seconds between a peer's heartbeats (default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="swarm steps between the keeper's checkpoints (default %(default)s)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="checkpoints kept on disk (default %(default)s)")
    p.add_argument("--ledger", default=d.ledger, metavar="PATH|URL",
                   help="where the run's ledger lives: an SQLite file (default: ledger.sqlite in the workdir) or "
                        "postgresql://USER@HOST/DB, which several coordinators (each with its own --workdir, the "
                        "same --corpus and run flags, --no-keeper on all but one) can serve at once; a password "
                        "is better given in PGPASSWORD or ~/.pgpass than in the URL")
    p.add_argument("--invite-only", action="store_true",
                   help="admit only new peers that bring an invite (hivefold coordinator invite --workdir DIR); "
                        "peers admitted before keep their place")
    p.add_argument("--rpc-rate", type=float, default=d.rpc_rate, metavar="PER_SECOND",
                   help="requests a second each peer may send (bursts of twice that), and each address before it "
                        "registers; past it peers are told to retry later (default %(default)s)")
    p.add_argument("--swarm-token-seconds", type=float, default=d.swarm_token_seconds, metavar="S",
                   help="lifetime of the tokens that admit peers to the swarm's DHT and averaging, renewed while "
                        "they run: a banned peer falls out within this time (default %(default)s)")
    p.add_argument("--ban-after-reports", type=int, default=d.ban_after_reports, metavar="N",
                   help="ban a member once N distinct peers caught it poisoning the averaging (one report alone "
                        "proves nothing: a hostile peer can report an honest one; where results are checked, only "
                        "peers with a verified result count); 0 never bans (default %(default)s)")
    p.add_argument("--verify-ceiling", type=float, default=d.verify_ceiling, metavar="P",
                   help="share of a new peer's results the keeper checks by replaying part of the training "
                        "(after n valid results in a row: 1/n, never below --verify-floor); 0 turns checks off "
                        "(default %(default)s)")
    p.add_argument("--verify-floor", type=float, default=d.verify_floor, metavar="P",
                   help="share of a trusted peer's results still checked (default %(default)s)")
    p.add_argument("--verify-tolerance", type=float, default=d.verify_tolerance, metavar="REL",
                   help="largest relative difference between a reported and a replayed loss: allows for GPU "
                        "nondeterminism and bf16 (default %(default)s)")
    p.add_argument("--proof-segments", type=int, default=d.proof_segments, metavar="N",
                   help="a checked shard is cut into N segments and one is replayed: the keeper's cost is ~1/N of "
                        "the shard's training (default %(default)s)")
    p.add_argument("--ban-after-invalid", type=int, default=d.ban_after_invalid, metavar="N",
                   help="ban a peer once N of its results failed verification; 0 never bans (default %(default)s)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="serve gRPC and HTTP with this certificate (chain included); default: a self-signed one "
                        "made in the workdir on first start, whose fingerprint is printed at every start")
    p.add_argument("--tls-key", type=Path, metavar="PEM",
                   help="the private key of --tls-cert (unencrypted PEM; default: the self-signed one's)")
    p.add_argument("--insecure", action="store_true",
                   help="serve plaintext gRPC and HTTP, unauthenticated (loopback development only)")
    p.add_argument("--no-keeper", action="store_true", help="run without the keeper (no checkpoints or val loss)")
    p.add_argument("--keeper-poll", type=float, default=d.keeper_poll,
                   help="seconds between the keeper's looks at the swarm's step (default %(default)s)")
    p.add_argument("--token-budget", type=token_count, default=d.token_budget, metavar="TOKENS",
                   help="end the run once this many tokens are trained, e.g. 50M or 2G; peers finish and exit, the "
                        "keeper takes a final checkpoint; may be raised on a restart (default: none)")
    p.add_argument("--qrb-k", type=float, default=d.qrb_k,
                   help="quick-return bonus: points = base x max(1, sqrt(k x lease seconds / seconds taken)); "
                        "0 turns it off (default %(default)s)")
    g = p.add_argument_group("run definition (for a new run; must match when reopening a workdir)")
    for name, typ in (("corpus", str), ("model", str), ("seq_len", int), ("micro_batch", int),
                      ("target_batch_size", int), ("lr", float), ("warmup_steps", int), ("decay_steps", int),
                      ("shard_sequences", int), ("seed", int), ("data_passes", int), ("max_corpus_mb", float),
                      ("matchmaking_time", float), ("averaging_timeout", float), ("average_state_every", int),
                      ("averaging", str), ("inner_steps", int), ("outer_lr", float), ("outer_momentum", float),
                      ("compression", str)):
        # default None: a reopened run keeps its saved value; the help shows what a new run gets.
        g.add_argument("--" + name.replace("_", "-"), type=typ,
                       help=f"{RunOptions.HELP[name]} (default {RunOptions.DEFAULTS[name]})")


def token_count(text: str) -> int:
    """``123``, ``50k``, ``50M``, ``2G`` or ``1.5B`` tokens (decimal multiples)."""
    units = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}
    t = text.strip().upper()
    number, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens like 50M or 2G, got {text!r}") from None
    if not value >= 0 or value != value or value > 10**18:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 0, got {text!r}")
    return int(value)


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """Validate the parsed flags; raises ConfigError (exit 2) before anything touches the disk."""
    run = RunOptions(**{k: getattr(args, k) for k in RunOptions.DEFAULTS})
    return CoordinatorConfig(
        workdir=args.workdir, listen=args.listen, http=args.http,
        dht_listen=tuple(args.dht_listen or CoordinatorConfig.dht_listen),
        dht_announce=tuple(args.dht_announce or ()), lease_seconds=args.lease_seconds,
        lease_max_seconds=args.lease_max_seconds,
        heartbeat_interval=args.heartbeat_interval, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, keeper=not args.no_keeper, keeper_poll=args.keeper_poll,
        qrb_k=args.qrb_k, token_budget=args.token_budget, ledger=args.ledger, invite_only=args.invite_only,
        rpc_rate=args.rpc_rate, swarm_token_seconds=args.swarm_token_seconds,
        ban_after_reports=args.ban_after_reports, verify_floor=args.verify_floor,
        verify_ceiling=args.verify_ceiling, verify_tolerance=args.verify_tolerance,
        proof_segments=args.proof_segments, ban_after_invalid=args.ban_after_invalid, insecure=args.insecure,
        tls_cert=args.tls_cert, tls_key=args.tls_key, run=run)
