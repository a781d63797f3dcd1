"""The run's context: what every handler needs besides the request (settings, spec, ledger), and what follows
from them once (credit per sample, the receipt signer, the verification policy, what watchers see of the run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.credit import ReceiptSigner, base_points
from coordinator.ledger import Ledger, VerifyPolicy, is_postgres
from hivefold.proof import proof_max_bytes
from hivefold.spec import RunSpec


@dataclass
class Context:
    """What handlers need besides the request: the run, its ledger and the process's settings."""

    config: CoordinatorConfig
    spec: RunSpec
    ledger: Ledger
    dht_maddrs: list[str]

    def __post_init__(self) -> None:
        self.spec_json = self.spec.to_json()
        self.spec_hash = self.spec.hash
        # Credit ("points") per sequence: proportional to the compute one sequence costs (~6 * params * tokens),
        # in units of 1e9 FLOP-equivalents / 6, so bigger models earn more per sample (coordinator.credit).
        n = self.spec.model
        params = n.n_layer * 12 * n.d_model ** 2 + n.vocab_size * n.d_model
        self.credit_per_sample = base_points(1, seq_len=self.spec.seq_len, parameters=params)
        self.signer = ReceiptSigner(self.config.workdir, self.spec.run_id, self.spec.seq_len)
        self.shard_sequences = max(s.num_sequences for s in self.spec.shards)  # the work of one lease, at most
        c = self.config
        # Replaying training needs determinism: dropout draws random masks no replay can repeat.
        # The keeper checks; without one here only a shared ledger's other coordinator can have one.
        checker = c.keeper or is_postgres(c.ledger)
        off = ("--verify-ceiling 0" if c.verify_ceiling <= 0 else
               "no keeper to replay results" if not checker else
               "dropout: no replay can repeat its random masks" if n.dropout > 0 else "")
        segments = 0 if off else c.proof_segments
        self.proof_max_bytes = proof_max_bytes(params + n.max_seq_len * n.d_model)
        # two minutes, plus a second per MB of the largest proof (a 1 MB/s uplink)
        self.verify = VerifyPolicy(floor=c.verify_floor, ceiling=c.verify_ceiling, segments=segments,
                                   proof_seconds=120.0 + self.proof_max_bytes / 1e6)
        a = self.spec.averaging
        self.run_summary = {  # what watchers see of the run spec (the status document's "run")
            "model": {"n_layer": n.n_layer, "n_head": n.n_head, "d_model": n.d_model, "vocab_size": n.vocab_size,
                      "parameters": params},
            "seq_len": self.spec.seq_len, "micro_batch": self.spec.micro_batch,
            "target_batch_size": self.spec.target_batch_size, "corpus": self.spec.corpus_name,
            "shards": len(self.spec.shards), "data_passes": self.spec.data_passes,
            "averaging": {"mode": a.mode, "inner_steps": a.inner_steps, "outer_lr": a.outer_lr,
                          "outer_momentum": a.outer_momentum, "compression": a.compression},
            # who may join and how: watchers see what protects the run (README, "Security model")
            "access": {"tls": not self.config.insecure, "invite_only": self.config.invite_only,
                       "swarm_token_seconds": self.config.swarm_token_seconds,
                       "ban_after_reports": self.config.ban_after_reports},
            "verification": {"segments": segments, "off": off, "floor": c.verify_floor, "ceiling": c.verify_ceiling,
                             "tolerance": c.verify_tolerance, "ban_after_invalid": c.ban_after_invalid},
        }

    @property
    def workdir(self) -> Path:
        return self.config.workdir
