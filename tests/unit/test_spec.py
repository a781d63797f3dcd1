import dataclasses

import pytest

from hivefold.errors import ConfigError, IntegrityError
from hivefold.spec import (
    AveragingConfig,
    ModelConfig,
    OptimizerConfig,
    RunSpec,
    ShardInfo,
    model_config_from_name,
    verify_spec,
)


def make_spec(**overrides) -> RunSpec:
    fields = dict(run_id="r", seed=0, tokenizer="bytes", seq_len=32, micro_batch=4, target_batch_size=16,
                  model=ModelConfig(n_layer=1, n_head=1, d_model=16, max_seq_len=32), optimizer=OptimizerConfig(),
                  averaging=AveragingConfig(), shards=(ShardInfo(0, "ab" * 32, 100, 4),),
                  validation=ShardInfo(-1, "cd" * 32, 100, 4))
    fields.update(overrides)
    return RunSpec(**fields)


def test_hash_is_stable_and_roundtrips():
    spec = make_spec()
    assert spec.hash == make_spec().hash
    again = RunSpec.from_json(spec.to_json())
    assert again == spec and again.hash == spec.hash
    assert verify_spec(spec.to_json(), spec.hash) == spec


@pytest.mark.parametrize("change", [dict(seed=1), dict(micro_batch=8), dict(optimizer=OptimizerConfig(lr=1e-4)),
                                    dict(shards=(ShardInfo(0, "ef" * 32, 100, 4),))])
def test_any_change_changes_the_hash(change):
    assert make_spec(**change).hash != make_spec().hash


def test_verify_refuses_a_tampered_spec():
    spec = make_spec()
    tampered = spec.to_json().replace('"seed":0', '"seed":1')
    with pytest.raises(IntegrityError, match="hash mismatch"):
        verify_spec(tampered, spec.hash)


def test_invalid_specs_say_what_to_fix():
    with pytest.raises(ConfigError, match="target_batch_size"):
        make_spec(target_batch_size=2)
    with pytest.raises(ConfigError, match="max_seq_len"):
        make_spec(seq_len=64)
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=10, n_head=3)
    with pytest.raises(ConfigError, match="not valid"):
        RunSpec.from_json('{"run_id": 1}')


def test_model_names():
    tiny = model_config_from_name("tiny", vocab_size=257, max_seq_len=128)
    assert (tiny.n_layer, tiny.d_model) == (4, 128)
    custom = model_config_from_name("L2-H2-D64", vocab_size=257, max_seq_len=64)
    assert (custom.n_layer, custom.n_head, custom.d_model) == (2, 2, 64)
    with pytest.raises(ConfigError, match="unknown model 'huge'"):
        model_config_from_name("huge", vocab_size=257, max_seq_len=64)
    assert dataclasses.asdict(tiny)["vocab_size"] == 257
