"""Credit: the quick-return bonus, signed receipts, teams, /api/credit and ``hivefold receipts``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from coordinator.credit import quick_return_points
from coordinator.http import start_http
from coordinator.ledger import Ledger, Verdict
from coordinator.server import start_server
from hivefold.client import CoordinatorClient
from hivefold.errors import IntegrityError
from hivefold.identity import Identity
from hivefold.receipts import ReceiptBook, make_receipt, verify_receipt
from hivefold.spec import ShardInfo
from hivefold.tls import client_ssl_context
from protos import coordinator_pb2 as pb
from tests.conftest import serve_tls, small_run


def test_quick_return_bonus_matches_folding_at_home():
    # returning at k x deadline or later earns the base, never less
    assert quick_return_points(10.0, deadline_s=100, elapsed_s=75, k=0.75) == 10.0
    assert quick_return_points(10.0, deadline_s=100, elapsed_s=1000, k=0.75) == 10.0
    # four times faster than k x deadline: twice the points
    assert quick_return_points(10.0, deadline_s=100, elapsed_s=75 / 4, k=0.75) == pytest.approx(20.0)
    assert quick_return_points(10.0, deadline_s=100, elapsed_s=1, k=0.75) == pytest.approx(10 * math.sqrt(75))
    assert quick_return_points(10.0, deadline_s=100, elapsed_s=1, k=0) == 10.0  # bonus off


def test_a_receipt_verifies_and_any_change_breaks_it(tmp_path):
    key = Identity.load_or_create(tmp_path / "coord")
    fields = {"run_id": "r", "peer_id": "p", "lease_id": "l", "shard_id": 3, "tokens": 640, "points": 1.5,
              "accepted_at": 12.0}
    receipt = make_receipt(fields, key)
    assert verify_receipt(receipt, key.public_key) == fields
    doc = json.loads(receipt)
    doc["receipt"]["points"] = 1500.0  # inflating one's own credit
    with pytest.raises(IntegrityError, match="signature"):
        verify_receipt(json.dumps(doc))
    other = Identity.load_or_create(tmp_path / "other")
    forged = make_receipt(fields, other)  # signed by someone else
    assert verify_receipt(forged)["points"] == 1.5
    with pytest.raises(IntegrityError, match="another coordinator"):
        verify_receipt(forged, key.public_key)
    with pytest.raises(IntegrityError, match="not a hivefold receipt"):
        verify_receipt("{")


def test_ledger_credits_once_with_the_bonus_and_keeps_the_receipt(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.init_run(run_id="r", spec_hash="h", shards=[ShardInfo(0, "0" * 64, 10, 8)], seed=0, data_passes=0, now=0)
    ledger.register_peer(peer_id="a", name="a", public_key=b"k", device_kind="cpu", device_name="",
                         memory_bytes=0, team="red", now=0.0)
    lease = ledger.lease_shard("a", lease_seconds=100, now=0.0).lease
    signed = []

    def sign(**fields):
        signed.append(fields)
        return json.dumps(fields)

    first = ledger.submit("a", lease.lease_id, samples=8, losses=[], compute_seconds=1, credit_per_sample=0.5,
                          now=75 / 4, qrb_k=0.75, qrb_deadline_s=100, sign_receipt=sign)
    assert first.verdict is Verdict.ACCEPTED and first.credit == pytest.approx(8.0)  # 4 points base, twice
    assert json.loads(first.receipt)["points"] == pytest.approx(8.0) and signed[0]["samples"] == 8
    again = ledger.submit("a", lease.lease_id, samples=8, losses=[], compute_seconds=1, credit_per_sample=0.5,
                          now=50.0, qrb_k=0.75, qrb_deadline_s=100, sign_receipt=sign)
    assert again == first and len(signed) == 1  # the first answer, its receipt, nothing credited twice
    board = ledger.credit_board(seq_len=4)
    assert board["peers"][0]["points"] == pytest.approx(8.0) and board["peers"][0]["tokens"] == 32
    assert board["teams"] == [{"team": "red", "points": 8.0, "shards": 1, "peers": 1}]
    ledger.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ctx = small_run(tmp_path_factory.mktemp("coordinator"), dht_maddrs=[])
    ledger = ctx.ledger
    tls, key_file, _ = serve_tls(ctx.config.workdir)
    server, port = start_server(ctx, "127.0.0.1:0", tls=tls)
    http, http_port = start_http(ctx, "127.0.0.1:0", tls=tls.ssl_context(key_file))
    yield ctx, f"127.0.0.1:{port}", (f"https://127.0.0.1:{http_port}", client_ssl_context(tls.cert_pem))
    server.stop(0)
    http.shutdown()
    ledger.close()


def test_an_accepted_result_comes_with_a_receipt_the_peer_can_check(served, tmp_path):
    ctx, address, (http, https) = served
    client = CoordinatorClient(address, give_up_after=5.0)
    reg = client.register(Identity.load_or_create(tmp_path), name="carol", device=pb.DeviceReport(kind="cpu"),
                          team="blue")
    assert reg.receipt_public_key == ctx.signer.key.public_key
    work = client.lease().work
    t0 = time.time()
    resp = client.submit(pb.SubmitResultRequest(lease_id=work.lease_id, samples=work.num_sequences,
                                                losses=[pb.MicroBatchLoss(loss=2.0, epoch=0)]))
    fields = verify_receipt(resp.receipt, reg.receipt_public_key)
    assert fields["peer_id"] == reg.peer_id and fields["lease_id"] == work.lease_id
    assert fields["tokens"] == work.num_sequences * ctx.spec.seq_len
    assert fields["points"] == pytest.approx(resp.credit, rel=1e-6) and t0 - 1 <= fields["accepted_at"] <= time.time()
    base = work.num_sequences * ctx.credit_per_sample
    assert resp.credit > base  # returned at once: the quick-return bonus applies
    # a repeated submission returns the same receipt
    assert client.submit(pb.SubmitResultRequest(lease_id=work.lease_id, samples=work.num_sequences)).receipt == \
        resp.receipt
    with urllib.request.urlopen(http + "/api/credit", context=https) as r:
        board = json.load(r)
    assert board["receipt_public_key"] == reg.receipt_public_key.hex() and board["qrb_k"] == 0.75
    me = next(p for p in board["peers"] if p["peer_id"] == reg.peer_id)
    assert me == {"peer_id": reg.peer_id, "name": "carol", "team": "blue", "points": round(resp.credit, 3),
                  "shards": 1, "tokens": fields["tokens"]}
    assert any(t["team"] == "blue" for t in client.status()["teams"])
    client.close()


def test_a_bad_team_name_is_refused(served, tmp_path):
    _, address, _ = served
    client = CoordinatorClient(address, give_up_after=5.0)
    with pytest.raises(grpc.RpcError) as info:
        client.register(Identity.load_or_create(tmp_path), name="dave", device=pb.DeviceReport(), team="x" * 40)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "team must be" in info.value.details()
    client.close()


def test_receipts_command_totals_verified_receipts_and_flags_forged_ones(tmp_path):
    key = Identity.load_or_create(tmp_path / "coord")
    book = ReceiptBook(tmp_path / "peer")
    (tmp_path / "peer").mkdir()
    for i in range(3):
        book.add(make_receipt({"run_id": "r", "peer_id": "p", "lease_id": f"l{i}", "shard_id": i, "tokens": 100,
                               "points": 2.0, "accepted_at": float(i)}, key), key.public_key)
    book.add(make_receipt({"run_id": "r", "peer_id": "p", "lease_id": "l0", "shard_id": 0, "tokens": 100,
                           "points": 2.0, "accepted_at": 0.0}, key), key.public_key)  # an acknowledgement twice

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "hivefold", "receipts", "--workdir", str(tmp_path / "peer"),
                               *extra], capture_output=True, text=True, timeout=60)

    ok = run("--json", "--public-key", key.public_key.hex())
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"receipts": 3, "points": 6.0, "tokens": 300, "runs": ["r"], "invalid": []}
    with book.path.open("a") as f:
        f.write(book.path.read_text().splitlines()[0].replace('"points": 2.0', '"points": 200.0') + "\n")
    forged = run()
    assert forged.returncode == 1 and "line 5" in forged.stderr and "signature" in forged.stderr
    assert "3 receipts verified: 6.000 points" in forged.stdout
    assert "must be the coordinator's key" in run("--public-key", "zz").stderr
