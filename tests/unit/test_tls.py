"""TLS: the coordinator's certificate, and whom a client trusts (pinned, first use, changed, plaintext)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.http import start_http
from coordinator.server import start_server
from hivefold.client import CoordinatorClient
from hivefold.errors import ConfigError
from hivefold.retry import Unreachable
from hivefold.tls import (
    KNOWN_ENV,
    SERVER_NAME,
    ServerTLS,
    Trust,
    TrustError,
    client_ssl_context,
    fingerprint,
    parse_fingerprint,
    server_tls,
)
from tests.conftest import small_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ctx = small_run(tmp_path_factory.mktemp("coordinator"))
    yield ctx
    ctx.ledger.close()


def serve(ctx, tls, port: int = 0):
    server, port = start_server(ctx, f"127.0.0.1:{port}", tls=tls)
    return server, f"127.0.0.1:{port}"


def test_a_self_signed_certificate_is_made_once_with_a_private_key(tmp_path):
    tls, key_file = server_tls(tmp_path, hosts=("10.1.2.3", "coord.example.org"))
    assert tls.self_signed and len(tls.fingerprint) == 64
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(tls.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {SERVER_NAME, "localhost", "coord.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert "10.1.2.3" in {str(a) for a in names.get_values_for_type(x509.IPAddress)}
    again, _ = server_tls(tmp_path)
    assert again.fingerprint == tls.fingerprint  # every start serves the same certificate


def test_bad_certificate_files_are_refused_with_a_reason(tmp_path):
    a, a_key = server_tls(tmp_path / "a")
    _, b_key = server_tls(tmp_path / "b")
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        server_tls(tmp_path, a.cert_path, b_key)
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        server_tls(tmp_path, tmp_path / "junk.pem", a_key)
    with pytest.raises(ConfigError, match="is not an unencrypted PEM private key"):
        server_tls(tmp_path, a.cert_path, tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        server_tls(tmp_path, tmp_path / "missing.pem", a_key)
    with pytest.raises(ConfigError, match="go together"):
        server_tls(tmp_path, a.cert_path, None)


def test_fingerprints_are_read_as_other_tools_print_them():
    fp = "ab" * 32
    assert parse_fingerprint(":".join(["AB"] * 32)) == fp and parse_fingerprint(f" {fp.upper()} ") == fp
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_fingerprint("ab" * 31)
    with pytest.raises(ConfigError, match="contradict"):
        Trust(fingerprint=fp, insecure=True)


def test_first_use_is_recorded_and_a_changed_certificate_refused_until_pinned(run, tmp_path, known_coordinators):
    first, _ = server_tls(tmp_path / "first")
    server, address = serve(run, first)
    assert CoordinatorClient(address, give_up_after=5).status()["run_id"] == run.spec.run_id
    assert f"{address} {first.fingerprint}" in known_coordinators.read_text()
    server.stop(0).wait()
    # an impersonator (or a reinstalled coordinator) on the same address, with another certificate
    second, _ = server_tls(tmp_path / "second")
    server, _ = serve(run, second, port=int(address.rpartition(":")[2]))
    try:
        with pytest.raises(TrustError) as info:
            CoordinatorClient(address, give_up_after=5).status()
        message = str(info.value)
        assert second.fingerprint in message and first.fingerprint in message
        assert "--coordinator-fingerprint" in message and str(known_coordinators) in message
        with pytest.raises(TrustError, match="not " + first.fingerprint):  # pinned to the old one: refused
            CoordinatorClient(address, trust=Trust(fingerprint=first.fingerprint), give_up_after=5).status()
        # the operator confirms the change: pinning the new fingerprint accepts it and updates the record
        CoordinatorClient(address, trust=Trust(fingerprint=second.fingerprint), give_up_after=5).status()
        assert f"{address} {second.fingerprint}" in known_coordinators.read_text()
        assert first.fingerprint not in known_coordinators.read_text()
        CoordinatorClient(address, give_up_after=5).status()  # and first use is now the new one
    finally:
        server.stop(0)


def test_a_certificate_changed_under_a_running_client_is_refused_not_retried(run, tmp_path):
    first, _ = server_tls(tmp_path / "first")
    server, address = serve(run, first)
    client = CoordinatorClient(address, give_up_after=20)
    client.status()
    server.stop(0).wait()
    second, _ = server_tls(tmp_path / "second")
    server, _ = serve(run, second, port=int(address.rpartition(":")[2]))
    try:
        with pytest.raises(TrustError, match="different certificate"):
            client.status()
    finally:
        server.stop(0)
        client.close()


def test_plaintext_and_tls_are_never_mixed_silently(run, tmp_path):
    tls, _ = server_tls(tmp_path)
    server, address = serve(run, tls)
    try:
        with pytest.raises(TrustError, match="speaks TLS: drop --insecure"):
            CoordinatorClient(address, trust=Trust(insecure=True), give_up_after=5).status()
    finally:
        server.stop(0).wait()
    server, address = serve(run, None)
    try:
        with pytest.raises(TrustError, match=r"does not speak TLS \(was it started with --insecure\?\)"):
            CoordinatorClient(address, give_up_after=5).status()
        assert CoordinatorClient(address, trust=Trust(insecure=True), give_up_after=5).status()["run_id"]
    finally:
        server.stop(0)


def test_a_coordinator_not_up_yet_is_retried_then_reported_unreachable(tmp_path):
    client = CoordinatorClient("127.0.0.1:1", give_up_after=1.0)
    with pytest.raises(Unreachable, match="cannot connect"):
        client.status()


def test_an_operators_certificate_is_checked_under_its_own_name(run, tmp_path):
    """A self-signed certificate the operator made (no hivefold name in it) works when pinned."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coord.example.org")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("coord.example.org")]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    tls, _ = server_tls(tmp_path / "wd", tmp_path / "cert.pem", tmp_path / "key.pem")
    assert not (tmp_path / "wd").exists()  # nothing self-signed was made
    server, address = serve(run, tls)
    try:
        assert CoordinatorClient(address, trust=Trust(fingerprint=tls.fingerprint), give_up_after=5).status()
    finally:
        server.stop(0)


def private_ca(tmp_path, names: list) -> tuple[ServerTLS, Path]:
    """An operator's certificate for ``names`` (x509 general names) from a private CA, served with its chain;
    and the CA's certificate file."""
    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("Example Private CA")).issuer_name(name("Example Private CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("coordinator")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    tls, _ = server_tls(tmp_path / "wd", tmp_path / "chain.pem", tmp_path / "key.pem")
    assert tls.fingerprint == fingerprint(leaf.public_bytes(serialization.Encoding.DER))  # the server's own
    return tls, tmp_path / "ca.pem"


@pytest.mark.parametrize("names", [[x509.DNSName("coord.internal")], [x509.DNSName("*.coord.internal")],
                                   [x509.IPAddress(ipaddress.ip_address("10.9.8.7"))]],
                         ids=["dns-name", "wildcard", "ip-only"])
def test_a_certificate_from_a_private_ca_works_pinned_and_on_first_use(run, tmp_path, known_coordinators, names):
    """The system's roots do not know a private CA: pinned, or trusted on first use, its certificate is the
    anchor (gRPC had been given the system's roots, and the handshake failed after the pin matched)."""
    tls, _ = private_ca(tmp_path, names)
    server, address = serve(run, tls)
    http, port = start_http(run, "127.0.0.1:0", tls=tls.ssl_context(tmp_path / "key.pem"))
    try:
        assert CoordinatorClient(address, trust=Trust(fingerprint=tls.fingerprint), give_up_after=5).status()
        known_coordinators.unlink()
        assert CoordinatorClient(address, give_up_after=5).status()
        assert f"{address} {tls.fingerprint}" in known_coordinators.read_text()
        leaf = tls.cert_pem[:tls.cert_pem.index(b"-----END CERTIFICATE-----") + 25]  # without its CA
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/api/status", context=client_ssl_context(leaf),
                                    timeout=10) as r:
            assert r.status == 200
    finally:
        server.stop(0)
        http.shutdown()


def test_a_certificate_the_system_trusts_needs_no_pin_and_is_not_recorded(run, tmp_path, known_coordinators):
    """A real certificate: the system's roots (here a CA put there through OpenSSL's and gRPC's root file variables,
    in a process of its own) vouch for it under the address's name; nothing is trusted on first use."""
    tls, ca = private_ca(tmp_path, [x509.DNSName("localhost")])
    server, address = serve(run, tls)
    port = address.rpartition(":")[2]
    env = {**os.environ, "SSL_CERT_FILE": str(ca), "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(ca),
           KNOWN_ENV: str(known_coordinators)}
    try:
        out = subprocess.run([sys.executable, "-m", "hivefold", "status", "--coordinator", f"localhost:{port}",
                              "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout)["run_id"] == run.spec.run_id
        assert not known_coordinators.exists() and "first use" not in out.stderr, out.stderr[-3000:]
        # without that CA the same certificate is only trusted on first use
        env.pop("SSL_CERT_FILE"), env.pop("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
        out = subprocess.run([sys.executable, "-m", "hivefold", "status", "--coordinator", f"localhost:{port}",
                              "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "first use" in out.stderr, out.stderr[-3000:]
        assert tls.fingerprint in known_coordinators.read_text()
    finally:
        server.stop(0)


def test_the_http_side_is_https_with_the_same_certificate(run, tmp_path):
    tls, key_file = server_tls(tmp_path / "mine")
    other, _ = server_tls(tmp_path / "other")
    http, port = start_http(run, "127.0.0.1:0", tls=tls.ssl_context(key_file))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/api/status", context=client_ssl_context(tls.cert_pem),
                                    timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.URLError) as info:  # a client that trusts another certificate
            urllib.request.urlopen(f"https://127.0.0.1:{port}/api/status", context=client_ssl_context(other.cert_pem),
                                   timeout=10)
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP gets nothing
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10)
        # and the server keeps serving after those
        with urllib.request.urlopen(f"https://localhost:{port}/", context=ssl.create_default_context(
                cadata=tls.cert_pem.decode()), timeout=10) as r:  # full host name check: localhost is in it
            assert r.status == 200
    finally:
        http.shutdown()

