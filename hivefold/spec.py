"""The run spec: everything that defines a training run, pinned by one hash.

The coordinator builds the spec once when it creates a run and saves it in its workdir; peers get
it in ``Register``'s answer, recompute its hash, and refuse to train if it differs from the hash
they were told or trained under before. Canonical JSON (sorted keys, no spaces) makes the hash
independent of field order and Python version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from hivefold.errors import ConfigError, IntegrityError


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the decoder-only transformer (see ``hivefold.model``)."""

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide d_model
    d_model: int = 128  # residual stream width
    vocab_size: int = 257  # set from the tokenizer; 257 = 256 bytes + end-of-text
    max_seq_len: int = 128  # positional embedding table size; >= the run's seq_len
    dropout: float = 0.0  # off by default: volunteers train few epochs over the data

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model dropout must be in [0, 1), got {self.dropout}")


# Named sizes; parameter counts are for the byte tokenizer (vocab 257) at seq_len 128.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128),  # ~0.8M parameters: CPU demos and tests
    "small": dict(n_layer=6, n_head=6, d_model=384),  # ~11M: a laptop or small GPU
    "base": dict(n_layer=12, n_head=12, d_model=768),  # ~85M: GPUs
}


def model_config_from_name(name: str, *, vocab_size: int, max_seq_len: int) -> ModelConfig:
    """Resolve ``tiny|small|base`` or explicit dims ``L<layers>-H<heads>-D<width>`` (e.g. ``L2-H2-D64``)."""
    if name in MODEL_PRESETS:
        return ModelConfig(**MODEL_PRESETS[name], vocab_size=vocab_size, max_seq_len=max_seq_len)
    parts = name.upper().split("-")
    try:
        dims = {p[0]: int(p[1:]) for p in parts}
        if len(parts) != 3 or set(dims) != {"L", "H", "D"}:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"unknown model {name!r}: use one of {', '.join(MODEL_PRESETS)} or explicit dims like L2-H2-D64"
        ) from None
    return ModelConfig(n_layer=dims["L"], n_head=dims["H"], d_model=dims["D"], vocab_size=vocab_size,
                       max_seq_len=max_seq_len)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, stepped once per swarm step (hivemind epoch)."""

    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10  # swarm steps of linear warmup from 0
    decay_steps: int = 2000  # swarm steps of cosine decay after warmup
    min_lr_ratio: float = 0.1  # floor of the cosine, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm applied by each peer before accumulation; 0 = off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ConfigError("warmup_steps must be >= 0 and decay_steps >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


AVERAGING_MODES = ("sync", "diloco")
COMPRESSIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class AveragingConfig:
    """How peers combine their work; every peer must share these settings (see ``hivefold.averaging``)."""

    matchmaking_time: float = 3.0  # seconds peers wait to gather an all-reduce group
    averaging_timeout: float = 30.0  # give up an all-reduce round after this many seconds
    average_state_every: int = 5  # sync: swarm steps between parameter averaging (drift correction)
    # Fields below were added after the first release; at these values they are left out of the canonical
    # JSON, so the spec (and hash) of a run created before them is unchanged.
    mode: str = "sync"  # sync: all-reduce gradients every swarm step; diloco: local AdamW, then an outer step
    inner_steps: int = 100  # diloco: micro-batches (at the spec's micro_batch) the swarm trains per outer round
    outer_lr: float = 0.7  # diloco: outer Nesterov SGD learning rate
    outer_momentum: float = 0.9  # diloco: outer Nesterov momentum
    compression: str = "fp32"  # values on the wire in the all-reduce: fp32 | fp16 | int8 | int4

    def __post_init__(self) -> None:
        if self.mode not in AVERAGING_MODES:
            raise ConfigError(f"averaging mode must be one of {', '.join(AVERAGING_MODES)}, got {self.mode!r}")
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.inner_steps < 1:
            raise ConfigError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if not self.outer_lr > 0 or not 0 <= self.outer_momentum < 1:
            raise ConfigError(f"outer_lr must be > 0 and outer_momentum in [0, 1), got {self.outer_lr}, "
                              f"{self.outer_momentum}")


_ADDED_LATER = {"averaging": {"mode": "sync", "inner_steps": 100, "outer_lr": 0.7, "outer_momentum": 0.9,
                              "compression": "fp32"}}


@dataclass(frozen=True)
class ShardInfo:
    """One work unit's file, pinned by its content hash."""

    shard_id: int
    sha256: str
    byte_size: int
    num_sequences: int


@dataclass(frozen=True)
class RunSpec:
    """Everything peers must agree on to train together. Hash with :func:`spec_hash`."""

    run_id: str  # hivemind run id (DHT key prefix); unique per run
    seed: int  # model init and data order
    tokenizer: str  # tokenizer name, see hivefold.tokenizer
    seq_len: int  # tokens per training sequence (inputs; targets are shifted by one)
    micro_batch: int  # sequences per forward/backward pass on a peer
    target_batch_size: int  # sequences the swarm accumulates before one optimizer step
    model: ModelConfig
    optimizer: OptimizerConfig
    averaging: AveragingConfig
    shards: tuple[ShardInfo, ...]  # training shards, leased to peers
    validation: ShardInfo  # held-out shard, never leased
    corpus_name: str = ""  # where the text came from (informational)
    data_passes: int = 0  # passes over the shards before the run completes; 0 = no limit

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {self.model.max_seq_len}")
        if self.micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.target_batch_size < self.micro_batch:
            raise ConfigError(
                f"target_batch_size ({self.target_batch_size}) must be >= micro_batch ({self.micro_batch})"
            )
        if not self.shards:
            raise ConfigError("a run needs at least one training shard")

    def to_json(self) -> str:
        """Canonical JSON: the bytes that :func:`spec_hash` hashes."""
        raw = dataclasses.asdict(self)
        for section, defaults in _ADDED_LATER.items():
            for key, value in defaults.items():
                if raw[section].get(key) == value:
                    del raw[section][key]
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))

    @property
    def round_samples(self) -> int:
        """diloco: sequences the whole swarm trains per outer round."""
        return self.averaging.inner_steps * self.micro_batch

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        try:
            raw = json.loads(text)
            return cls(
                **{k: v for k, v in raw.items() if k not in ("model", "optimizer", "averaging", "shards",
                                                              "validation")},
                model=ModelConfig(**raw["model"]),
                optimizer=OptimizerConfig(**{**raw["optimizer"], "betas": tuple(raw["optimizer"]["betas"])}),
                averaging=AveragingConfig(**raw["averaging"]),
                shards=tuple(ShardInfo(**s) for s in raw["shards"]),
                validation=ShardInfo(**raw["validation"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"run spec is not valid: {e}") from e

    @property
    def hash(self) -> str:
        return spec_hash(self.to_json())


def spec_hash(spec_json: str) -> str:
    """sha256 (hex) of a spec's canonical JSON."""
    return hashlib.sha256(spec_json.encode()).hexdigest()


def verify_spec(spec_json: str, expected_hash: str) -> RunSpec:
    """Parse a spec received over the network, refusing it unless it hashes to ``expected_hash``."""
    actual = spec_hash(spec_json)
    if actual != expected_hash:
        raise IntegrityError(f"run spec hash mismatch: got {actual[:12]}, expected {expected_hash[:12]}")
    spec = RunSpec.from_json(spec_json)
    if spec.to_json() != spec_json:
        raise IntegrityError("run spec is not in canonical form; the coordinator and peer versions may differ")
    return spec

