"""Create a run in a workdir, or reopen the one already there.

Layout of a coordinator workdir:
    spec.json        the run spec (canonical JSON; its sha256 is the run's spec hash)
    ledger.sqlite    the ledger (see coordinator.ledger)
    shards/          shard-NNNNNN.npy and validation.npy
    checkpoints/     step-NNNNNNNN.pt written by the keeper, and spec.json beside them
    dht.key          the bootstrap DHT node's identity, so its address survives restarts
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from coordinator.config import RunOptions
from coordinator.errors import FailedPrecondition
from coordinator.ledger import Ledger
from hivefold.corpus import STDLIB, read_documents
from hivefold.errors import ConfigError
from hivefold.shards import VAL_FILENAME, build_shards, shard_filename
from hivefold.spec import AveragingConfig, OptimizerConfig, RunSpec, model_config_from_name
from hivefold.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
LEDGER_FILE = "ledger.sqlite"
LEDGER_ENV = "HIVEFOLD_LEDGER"  # how the coordinator tells its keeper where the ledger is
SHARD_DIR = "shards"
CHECKPOINT_DIR = "checkpoints"
MAX_VAL_SEQUENCES = 128  # enough for a stable loss estimate, cheap enough to evaluate on a CPU
VAL_FRACTION = 0.02


def build_spec(options: RunOptions, workdir: Path) -> RunSpec:
    """Read the corpus, write its shards under ``workdir/shards`` and return the new run's spec."""
    o = options.resolved
    tokenizer = get_tokenizer("bytes")
    max_mb = o("max_corpus_mb")
    t0 = time.monotonic()
    docs, description, stats = read_documents(o("corpus"), max_chars=int(max_mb * 1e6) if max_mb else None)
    shards, val = build_shards(docs, tokenizer, seq_len=o("seq_len"), shard_sequences=o("shard_sequences"),
                               val_fraction=VAL_FRACTION, max_val_sequences=MAX_VAL_SEQUENCES, seed=o("seed"),
                               out_dir=workdir / SHARD_DIR)
    log.info("corpus %s: %s", description, stats)
    log.info("corpus: %d documents -> %d shards + %d validation sequences in %.1fs", len(docs), len(shards),
             val.num_sequences, time.monotonic() - t0)
    model = model_config_from_name(o("model"), vocab_size=tokenizer.vocab_size, max_seq_len=o("seq_len"))
    draft = dict(
        seed=o("seed"), tokenizer=tokenizer.name, seq_len=o("seq_len"), micro_batch=o("micro_batch"),
        target_batch_size=o("target_batch_size"), model=model,
        optimizer=OptimizerConfig(lr=o("lr"), warmup_steps=o("warmup_steps"), decay_steps=o("decay_steps")),
        averaging=AveragingConfig(matchmaking_time=o("matchmaking_time"), averaging_timeout=o("averaging_timeout"),
                                  mode=o("averaging"), inner_steps=o("inner_steps"), outer_lr=o("outer_lr"),
                                  outer_momentum=o("outer_momentum"), compression=o("compression"),
                                  average_state_every=o("average_state_every")),
        shards=tuple(shards), validation=val, corpus_name=f"{o('corpus')} ({description})",
        data_passes=o("data_passes"),
    )
    provisional = RunSpec(run_id="", **draft)
    # The run id carries the spec's hash, so two different runs never share hivemind DHT keys.
    return RunSpec(run_id=f"hivefold-{provisional.hash[:12]}", **draft)


def _check_reopen(spec: RunSpec, options: RunOptions) -> None:
    saved = {
        "model": None, "seq_len": spec.seq_len, "micro_batch": spec.micro_batch,
        "target_batch_size": spec.target_batch_size, "lr": spec.optimizer.lr,
        "warmup_steps": spec.optimizer.warmup_steps, "decay_steps": spec.optimizer.decay_steps,
        "seed": spec.seed, "data_passes": spec.data_passes, "matchmaking_time": spec.averaging.matchmaking_time,
        "averaging_timeout": spec.averaging.averaging_timeout,
        "average_state_every": spec.averaging.average_state_every, "averaging": spec.averaging.mode,
        "inner_steps": spec.averaging.inner_steps, "outer_lr": spec.averaging.outer_lr,
        "outer_momentum": spec.averaging.outer_momentum, "compression": spec.averaging.compression,
    }
    if options.model is not None:
        wanted = model_config_from_name(options.model, vocab_size=spec.model.vocab_size,
                                        max_seq_len=spec.model.max_seq_len)
        if wanted != spec.model:
            raise ConfigError(f"the workdir holds a run with a different model ({spec.model}); drop --model to "
                              "resume it, or use a fresh --workdir for a new run")
    for name, value in saved.items():
        given = getattr(options, name)
        if value is not None and given is not None and given != value:
            raise ConfigError(f"the workdir holds a run with {name}={value}, but --{name.replace('_', '-')}={given} "
                              "was given; drop the flag to resume the run, or use a fresh --workdir")
    # The corpus flags only shape a new run's shards: reopening keeps the saved shards, so a different
    # value is ignored with a warning, the same value silently, and one the spec cannot tell at debug level.
    for name, same in (("corpus", _same_corpus(options.corpus, spec.corpus_name)),
                       ("shard_sequences", _same_shard_sequences(options.shard_sequences, spec)),
                       ("max_corpus_mb", None)):  # the spec does not record it
        given = getattr(options, name)
        if given is None or same is True:
            continue
        flag = "--" + name.replace("_", "-")
        if same is False:
            log.warning("%s=%s is ignored: it differs from run %s in the workdir, whose shards are kept; drop the "
                        "flag to resume that run, or use a fresh --workdir for a new one", flag, given, spec.run_id)
        else:
            log.debug("%s=%s: the saved run %s does not record it; reopening with the saved shards", flag, given,
                      spec.run_id)


def _same_corpus(given: str | None, corpus_name: str) -> bool | None:
    """Whether ``--corpus given`` names the saved run's corpus; None if the spec's ``corpus_name`` cannot tell.

    ``corpus_name`` is ``"<--corpus> (<description>)"``, where the description of a path is the path
    resolved when the run was created: compare resolved paths, since the coordinator's cwd may differ now.
    """
    if given is None:
        return None
    saved, sep, description = corpus_name.partition(" (")
    if not sep or not description.endswith(")"):
        return None
    if given == STDLIB or saved == STDLIB:
        return given == saved
    return corpus_name.endswith(f" ({Path(given).expanduser().resolve()})")


def _same_shard_sequences(given: int | None, spec: RunSpec) -> bool | None:
    """Whether ``--shard-sequences given`` matches the saved shards; None if they cannot tell."""
    if given is None:
        return None
    first = spec.shards[0].num_sequences
    if len(spec.shards) > 1 or given <= first:
        return given == first  # only the last shard may be short; a lone shard holds <= shard_sequences
    return None  # a lone, short shard: the corpus may simply have been smaller than --shard-sequences


def ledger_location(workdir: Path, ledger: str = "") -> str:
    """``--ledger`` as given, else the SQLite file in the workdir."""
    return ledger or str(workdir / LEDGER_FILE)


def open_run(workdir: Path, options: RunOptions, ledger: str = "") -> tuple[RunSpec, Ledger]:
    """Reopen the run in ``workdir`` or create one; returns its spec and its open ledger (``--ledger``)."""
    spec_path = workdir / SPEC_FILE
    if not spec_path.exists():
        options = options.with_defaults()  # a new run: check the options together before writing anything
    workdir.mkdir(parents=True, exist_ok=True)
    if spec_path.exists():
        spec = RunSpec.from_json(spec_path.read_text())
        _check_reopen(spec, options)
        missing = [s.shard_id for s in spec.shards if not (workdir / SHARD_DIR / shard_filename(s.shard_id)).exists()]
        if missing or not (workdir / SHARD_DIR / VAL_FILENAME).exists():
            raise ConfigError(f"{len(missing)} shard files are missing under {workdir / SHARD_DIR}; restore them or "
                              "start a fresh --workdir")
        log.info("reopened run %s (spec %s) in %s", spec.run_id, spec.hash[:12], workdir)
    else:
        spec = build_spec(options, workdir)
        tmp = spec_path.with_suffix(".tmp")
        tmp.write_text(spec.to_json())
        os.replace(tmp, spec_path)
        log.info("created run %s (spec %s) in %s", spec.run_id, spec.hash[:12], workdir)
    led = Ledger(ledger_location(workdir, ledger))
    try:
        led.init_run(run_id=spec.run_id, spec_hash=spec.hash, shards=list(spec.shards), seed=spec.seed,
                     data_passes=spec.data_passes, now=time.time())
    except FailedPrecondition as e:
        led.close()
        if not ledger:
            raise
        raise ConfigError(f"the ledger at {led.where} holds another run than {spec.run_id} ({e}): a coordinator "
                          "sharing a ledger needs the same --corpus and run flags as the first one") from None
    log.info("ledger: %s (%s)", led.where, led.backend)
    return spec, led
