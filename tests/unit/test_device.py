"""The peer's choice of micro-batch (the CUDA probe runs on a GPU machine: benchmarks/device_throughput.py)."""

from __future__ import annotations

import pytest
import torch

from hivefold.model import build_model
from hivefold.spec import model_config_from_name
from peer.device import choose_micro_batch


def _model():
    return build_model(model_config_from_name("L1-H2-D32", vocab_size=257, max_seq_len=32), seed=0)


def test_a_volunteers_micro_batch_wins_and_auto_on_a_cpu_is_the_runs():
    model = _model()
    assert choose_micro_batch(24, run_micro_batch=8, model=model, device="cpu", seq_len=32)[0] == 24
    mb, why = choose_micro_batch(0, run_micro_batch=8, model=model, device="cpu", seq_len=32)
    assert mb == 8 and "run's" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the probe runs on CUDA only (run on a GPU machine)")
def test_the_cuda_probe_picks_a_size_and_leaves_the_model_untouched():
    model = _model().cuda()
    before = [p.detach().clone() for p in model.parameters()]
    mb, why = choose_micro_batch(0, run_micro_batch=4, model=model, device="cuda", seq_len=32)
    assert mb >= 4 and mb % 4 == 0 and "samples/s by micro-batch" in why
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
