"""``hivefold demo``'s summary: built from the status document read before the stop, plus the final checkpoint."""

import io

import pytest
from rich.console import Console

from coordinator.ledger import Ledger
from hivefold import demo
from hivefold.checkpoint import checkpoint_filename, save_checkpoint
from hivefold.spec import ShardInfo
from tests.unit.test_spec import make_spec


@pytest.fixture
def status(tmp_path):
    """A document as the coordinator serves it: two evaluations, the latest checkpoint at step 10."""
    led = Ledger(":memory:")
    led.init_run(run_id="run", spec_hash="h" * 64, shards=[ShardInfo(i, f"{i:064x}", 100, 8) for i in range(4)],
                 seed=0, data_passes=0, now=0.0)
    led.register_peer(peer_id="a", name="a", public_key=b"a" * 32, device_kind="cpu", device_name="", memory_bytes=0,
                      now=0.0)
    lease = led.lease_shard("a", lease_seconds=60.0, now=1.0).lease
    led.submit("a", lease.lease_id, samples=8, losses=[(5.0, 0), (4.0, 11)], compute_seconds=1.0,
               credit_per_sample=1.0, now=2.0)
    for step, val_loss in ((0, 5.5), (10, 4.5)):
        path = tmp_path / checkpoint_filename(step)
        save_checkpoint(path, spec=make_spec(), step=step, model={}, optimizer=None, val_loss=val_loss)
        led.record_evaluation(step, val_loss, now=3.0)
        led.record_checkpoint(step, str(path), val_loss, now=3.0)
    doc = led.status(now=4.0, online_seconds=30.0, seq_len=128)
    led.close()
    return doc


def summary(status, monkeypatch) -> tuple[str, list]:
    sampled = []
    monkeypatch.setattr(demo, "generate_text", lambda path, prompt, **_: sampled.append(path) or prompt + "pass")
    out = io.StringIO()
    doc = demo.summarize(demo.with_final_checkpoint(status), Console(file=out, width=200))
    assert doc["sample"] == "def pass"
    return out.getvalue(), sampled


def test_the_summary_prints_the_status_documents_facts(status, monkeypatch, tmp_path):
    text, sampled = summary(status, monkeypatch)
    for row in ("swarm steps │ 11", "tokens trained │ 1,024", "shards done │ 1 of 4", "train loss │ 5.000 → 4.500",
                "validation loss │ 5.500 → 4.500", f"checkpoint │ {tmp_path / 'step-00000010.pt'} (step 10)"):
        assert row in " ".join(text.split()), text  # cells padded to the column's width
    assert sampled == [tmp_path / "step-00000010.pt"]
    # the swarm got one step past the checkpoint that the keeper could take: the summary says so
    assert "the final checkpoint is 1 swarm step behind the swarm" in " ".join(text.split()), text


def test_the_final_checkpoint_written_after_the_read_is_the_one_summarized(status, monkeypatch, tmp_path):
    final = tmp_path / checkpoint_filename(14)
    save_checkpoint(final, spec=make_spec(), step=14, model={}, optimizer=None, val_loss=3.25)
    text, sampled = summary(status, monkeypatch)
    flat = " ".join(text.split())
    assert "swarm steps │ 14" in flat and "validation loss │ 5.500 → 3.250" in flat, text
    assert f"checkpoint │ {final} (step 14)" in flat and sampled == [final]
    assert "behind" not in flat
    assert status["checkpoint"]["step"] == 10  # the caller's document is left as it was read


def test_the_demo_checks_results_on_a_cpu_and_not_on_a_gpu(tmp_path):
    """On a GPU the keeper's CPU replays would hold the demo's peers back (README, "Verified work")."""
    from coordinator.config import config_from_args
    from hivefold.cli import build_parser

    for gpu in (False, True):
        cmd = demo.coordinator_command(tmp_path, corpus="stdlib", model="tiny", gpu=gpu)
        assert cmd[1:3] == ["-m", "hivefold"]
        config = config_from_args(build_parser().parse_args(cmd[3:]))  # what `hivefold coordinator` would run
        assert config.verify_ceiling == (0.0 if gpu else 1.0)
