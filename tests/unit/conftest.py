"""Fixtures of the unit tests: ``ledger``, a small run on every ledger backend (see ``ledger_cases.py``)."""

import pytest

from coordinator.ledger import Ledger
from tests.unit.ledger_cases import SHARDS, location


@pytest.fixture(params=["memory", "file", "postgresql"])
def ledger(request, tmp_path):
    led = Ledger(location(request.param, request, tmp_path))
    led.init_run(run_id="run", spec_hash="h" * 64, shards=SHARDS, seed=7, data_passes=0, now=0.0)
    for name in ("a", "b"):
        led.register_peer(peer_id=name, name=name, public_key=name.encode() * 32, device_kind="cpu",
                          device_name="", memory_bytes=0, now=0.0)
    yield led
    led.close()
