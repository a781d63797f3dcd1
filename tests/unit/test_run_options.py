"""Run options are validated when the flags are parsed, before anything touches the disk, and reopening a
workdir compares them with its spec."""

import logging

import pytest

from coordinator.config import RunOptions
from coordinator.run import _check_reopen
from hivefold.errors import ConfigError
from hivefold.spec import AveragingConfig, ModelConfig, OptimizerConfig, RunSpec, ShardInfo


@pytest.mark.parametrize("options,message", [
    (dict(model="L2-H3-D64"), "--model L2-H3-D64: model d_model (64) must be divisible by n_head (3)"),
    (dict(model="huge"), "unknown model 'huge'"),
    (dict(seq_len=1), "--seq-len must be >= 2"),
    (dict(micro_batch=64, target_batch_size=32), "--micro-batch (64) must be <= --target-batch-size (32)"),
])
def test_bad_options_fail_at_construction(options, message):
    with pytest.raises(ConfigError) as e:
        RunOptions(**options)
    assert message in str(e.value)


def test_relations_with_defaults_are_checked_for_a_new_run_only():
    options = RunOptions(micro_batch=512)  # may be a reopened run's value, whose target batch is larger
    with pytest.raises(ConfigError, match=r"--micro-batch \(512\) must be <= --target-batch-size \(256\)"):
        options.with_defaults()
    full = RunOptions(model="L2-H2-D64").with_defaults()
    assert full.model == "L2-H2-D64" and full.seq_len == RunOptions.DEFAULTS["seq_len"]


def make_spec(corpus_name: str, shard_sizes=(8, 8, 3)) -> RunSpec:
    return RunSpec(run_id="hivefold-test", seed=0, tokenizer="bytes", seq_len=32, micro_batch=4, target_batch_size=16,
                   model=ModelConfig(n_layer=1, n_head=1, d_model=16, max_seq_len=32), optimizer=OptimizerConfig(),
                   averaging=AveragingConfig(),
                   shards=tuple(ShardInfo(i, "ab" * 32, 100, n) for i, n in enumerate(shard_sizes)),
                   validation=ShardInfo(-1, "cd" * 32, 100, 4), corpus_name=corpus_name)


LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR"}


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.DEBUG, logger="coordinator.run")

    def by_level() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {name: [] for name in LEVELS.values()}
        for r in caplog.records:  # by number: importing hivemind renames WARNING to WARN
            out[LEVELS[r.levelno]].append(r.getMessage())
        caplog.clear()
        return out

    return by_level


def test_reopening_with_the_same_corpus_is_quiet(tmp_path, monkeypatch, records):
    (tmp_path / "texts").mkdir()
    spec = make_spec(f"texts ({(tmp_path / 'texts').resolve()})")
    monkeypatch.chdir(tmp_path)
    for same in ("texts", "./texts/", str(tmp_path / "texts"), "../" + tmp_path.name + "/texts"):
        _check_reopen(spec, RunOptions(corpus=same))
        assert records()["WARNING"] == [], same
    _check_reopen(make_spec("stdlib (stdlib:/usr/lib/python3.11)"), RunOptions(corpus="stdlib"))
    assert records()["WARNING"] == []


def test_reopening_with_another_corpus_warns(tmp_path, monkeypatch, records):
    monkeypatch.chdir(tmp_path)
    spec = make_spec(f"texts ({tmp_path / 'texts'})")
    _check_reopen(spec, RunOptions(corpus="other"))
    _check_reopen(spec, RunOptions(corpus="stdlib"))
    _check_reopen(make_spec("stdlib (stdlib:/usr/lib/python3.11)"), RunOptions(corpus="texts"))
    warnings = records()["WARNING"]
    assert len(warnings) == 3 and all("is ignored: it differs from run hivefold-test" in w for w in warnings)
    assert warnings[0].startswith("--corpus=other ")


def test_a_corpus_name_that_cannot_be_compared_is_a_debug_line(records):
    _check_reopen(make_spec("something older"), RunOptions(corpus="texts"))
    logged = records()
    assert logged["WARNING"] == [] and any(m.startswith("--corpus=texts:") for m in logged["DEBUG"])


def test_shard_sequences_warns_only_when_it_differs(records):
    spec = make_spec("stdlib (x)", shard_sizes=(8, 8, 3))
    _check_reopen(spec, RunOptions(shard_sequences=8))
    assert records()["WARNING"] == []
    _check_reopen(spec, RunOptions(shard_sequences=16))
    assert [w.split(" ")[0] for w in records()["WARNING"]] == ["--shard-sequences=16"]
    lone = make_spec("stdlib (x)", shard_sizes=(3,))  # a corpus smaller than one shard
    _check_reopen(lone, RunOptions(shard_sequences=256))
    logged = records()
    assert logged["WARNING"] == [] and logged["DEBUG"]
    _check_reopen(lone, RunOptions(shard_sequences=2))
    assert len(records()["WARNING"]) == 1


def test_max_corpus_mb_cannot_be_compared_so_it_is_a_debug_line(records):
    _check_reopen(make_spec("stdlib (x)"), RunOptions(max_corpus_mb=5.0))
    logged = records()
    assert logged["WARNING"] == [] and any(m.startswith("--max-corpus-mb=5.0:") for m in logged["DEBUG"])


def test_reopening_still_refuses_a_different_run_definition():
    with pytest.raises(ConfigError, match="micro_batch=4, but --micro-batch=8"):
        _check_reopen(make_spec("stdlib (x)"), RunOptions(micro_batch=8))
