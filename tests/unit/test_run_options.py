"""Run options are validated when the flags are parsed, before anything touches the disk."""

import pytest

from coordinator.config import RunOptions
from hivefold.errors import ConfigError


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
