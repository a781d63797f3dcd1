"""A checkpoint comes from disk or the network: it is read without unpickling arbitrary objects."""

from __future__ import annotations

import pathlib

import pytest
import torch

from hivefold.checkpoint import load_checkpoint
from hivefold.errors import ConfigError


class _Payload:
    """Unpickled, it would create ``marker``: what a hostile checkpoint's author could run instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "step-00000010.pt"
    torch.save({"spec": "{}", "step": 10, "model": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(ConfigError, match="is not a hivefold checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    # what weights_only=False would have done: the test's payload is live
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_that_is_not_one_is_refused_with_a_reason(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(ConfigError, match="is not a hivefold checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
