"""TLS for the coordinator's gRPC and HTTP endpoints, and how a client decides to trust one.

The coordinator serves TLS by default: with the operator's certificate files, or with a self-signed
certificate it makes in its workdir on first start and reuses after. Its SHA-256 fingerprint (64 hex
digits, of the DER certificate) is printed at every start.

A client (``peer``, ``status``, ``doctor``) trusts, in this order:
1. ``--coordinator-fingerprint``: exactly that certificate, else nothing;
2. a certificate the system's roots vouch for under the address's host name (a real certificate);
3. on first use, as SSH does: the fingerprint is recorded in the known-coordinators file (``$HIVEFOLD_KNOWN_
   COORDINATORS``, else ``~/.config/hivefold/known_coordinators``) and a changed certificate is refused later
   with a message that says how to accept a legitimate change.
``--insecure`` (both ends) speaks plaintext, for loopback development, and says so loudly.

A certificate trusted by 1 or 3 is checked by pinning it as the only root, under the name it carries
(``SERVER_NAME`` for ours), so a peer may reach the coordinator by any address; so is one from a private CA.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from hivefold.errors import ConfigError, HivefoldError
from hivefold.netaddr import parse_host_port

log = logging.getLogger(__name__)

SERVER_NAME = "hivefold-coordinator"  # every self-signed certificate carries this name; clients check it
TLS_DIR = "tls"  # in the coordinator's workdir: cert.pem, key.pem (mode 0600)
KNOWN_ENV = "HIVEFOLD_KNOWN_COORDINATORS"
HANDSHAKE_TIMEOUT_S = 10.0
VALID_DAYS = 3650
INSECURE_WARNING = ("--insecure: plaintext, unauthenticated transport; anyone on the path can read and alter "
                    "the traffic. Use it on loopback for development only.")


class TrustError(HivefoldError):
    """The coordinator's certificate is not the one this client may trust."""


class _Unreachable(grpc.RpcError):
    """No TLS handshake was possible yet (the coordinator is down or starting): retried like UNAVAILABLE."""

    def __init__(self, details: str):
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details


def fingerprint(cert: bytes) -> str:
    """SHA-256 of a certificate (DER, or PEM which is converted), 64 lowercase hex digits."""
    if cert.lstrip().startswith(b"-----BEGIN"):  # the first certificate of a chain file: the server's own
        end = b"-----END CERTIFICATE-----"
        cert = ssl.PEM_cert_to_DER_cert(cert[:cert.index(end) + len(end)].decode())
    return hashlib.sha256(cert).hexdigest()


def parse_fingerprint(text: str, *, flag: str = "--coordinator-fingerprint") -> str:
    """64 hex digits; colons, spaces and case as other tools print them are accepted."""
    hexed = re.sub(r"[\s:]", "", text).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hexed):
        raise ConfigError(f"{flag} must be a SHA-256 fingerprint, 64 hex digits (the coordinator prints it at "
                          f"every start), got {text!r}")
    return hexed


# ---- the coordinator's side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerTLS:
    """The certificate and key the coordinator serves with."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    self_signed: bool

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])

    def ssl_context(self, key_path: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, key_path)
        return ctx


def server_tls(workdir: Path, cert_file: Path | None = None, key_file: Path | None = None,
               hosts: tuple[str, ...] = ()) -> tuple[ServerTLS, Path]:
    """The operator's certificate files (checked: they parse and belong together), else the workdir's
    self-signed certificate, made on first use. Returns it and the key file's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if (cert_file is None) != (key_file is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither for a self-signed certificate")
    if cert_file is None:
        cert_file, key_file = workdir / TLS_DIR / "cert.pem", workdir / TLS_DIR / "key.pem"
        if not cert_file.exists():
            _make_self_signed(cert_file, key_file, hosts)
    try:
        cert_pem, key_pem = cert_file.read_bytes(), key_file.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the TLS certificate or key: {e}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_file} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key_file} is not an unencrypted PEM private key") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, pub)
            != key.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise ConfigError(f"the key in {key_file} does not belong to the certificate in {cert_file}")
    return ServerTLS(cert_pem, key_pem, cert_file, cert.issuer == cert.subject), key_file


def _make_self_signed(cert_file: Path, key_file: Path, hosts: tuple[str, ...]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME), x509.DNSName("localhost")]
    for host in {socket.gethostname(), *hosts} - {"", "0.0.0.0", "::", "localhost", SERVER_NAME}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    tmp = key_file.with_name(key_file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(tmp, key_file)
    tmp = cert_file.with_name(cert_file.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_file)  # last: a certificate on disk always has its key
    log.info("made a self-signed TLS certificate in %s", cert_file.parent)


# ---- the client's side -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trust:
    """How a client trusts the coordinator it talks to (see the module docstring)."""

    fingerprint: str | None = None
    insecure: bool = False
    known_file: Path | None = None  # None: $HIVEFOLD_KNOWN_COORDINATORS, else ~/.config/hivefold/...

    def __post_init__(self) -> None:
        if self.fingerprint is not None and self.insecure:
            raise ConfigError("--insecure and --coordinator-fingerprint contradict each other: pick one")

    @property
    def known_path(self) -> Path:
        if self.known_file is not None:
            return self.known_file
        if os.environ.get(KNOWN_ENV):
            return Path(os.environ[KNOWN_ENV])
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        return config_home / "hivefold" / "known_coordinators"


def add_trust_arguments(p) -> None:
    """The client flags every command that talks to a coordinator takes."""
    p.add_argument("--coordinator-fingerprint", metavar="SHA256", default=None,
                   help="trust only the coordinator certificate with this SHA-256 fingerprint (it prints it at "
                        "every start); default: a certificate the system trusts, else trust on first use")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC, no certificate check (loopback development only)")


def trust_from_args(args) -> Trust:
    pin = args.coordinator_fingerprint
    return Trust(fingerprint=parse_fingerprint(pin) if pin else None, insecure=args.insecure)


def open_channel(address: str, trust: Trust, options: list) -> grpc.Channel:
    """A channel to ``address`` that trusts as ``trust`` says. Raises :class:`TrustError` for a certificate
    that must not be trusted, and a retryable UNAVAILABLE ``grpc.RpcError`` while the coordinator cannot be
    reached."""
    host, port = parse_host_port(address, flag="--coordinator")
    if trust.insecure:
        log.warning("%s (coordinator %s)", INSECURE_WARNING, address)
        try:
            _peer_certificate(host, port, address, verify=False)
        except (TrustError, _Unreachable):  # plaintext indeed, or down (the call retries)
            return grpc.insecure_channel(address, options=options)
        raise TrustError(f"the coordinator at {address} speaks TLS: drop --insecure (and pin its certificate with "
                         "--coordinator-fingerprint, or trust it on first use)")
    der = _peer_certificate(host, port, address, verify=False)
    system_ok = not _self_signed(der) and _system_trusts(host, port, address)
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    seen = fingerprint(der)
    if trust.fingerprint is not None:
        if seen != trust.fingerprint:
            raise TrustError(f"the coordinator at {address} presents a certificate with fingerprint {seen}, not "
                             f"{trust.fingerprint} as --coordinator-fingerprint requires: refusing to connect. "
                             "Check the fingerprint with the coordinator's operator (it is printed at every start).")
        _remember(trust.known_path, address, seen, replace=True)
    elif system_ok:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(), options=options)
    else:
        known = _known(trust.known_path, address)
        if known is None:
            _remember(trust.known_path, address, seen, replace=False)
            log.warning("trusting the coordinator at %s on first use: its certificate's fingerprint is %s "
                        "(recorded in %s). Compare it with the one the coordinator printed; pass "
                        "--coordinator-fingerprint to pin it from the start.", address, seen, trust.known_path)
        elif known != seen:
            raise TrustError(
                f"the coordinator at {address} presents a different certificate (fingerprint {seen}) than the one "
                f"first seen there ({known}, recorded in {trust.known_path}): refusing to connect, someone may be "
                "impersonating it. If its operator really changed the certificate, confirm the new fingerprint "
                "with them and run again with --coordinator-fingerprint NEW_FINGERPRINT (that also updates the "
                f"record), or delete the line for {address} from {trust.known_path}.")
    # Pinned or trusted on first use: that certificate is the only root, self-signed or from a CA the system does
    # not know (a private one); gRPC takes a server's own certificate as the anchor of its chain.
    creds = grpc.ssl_channel_credentials(root_certificates=pem)
    return grpc.secure_channel(address, creds,
                               options=[*options, ("grpc.ssl_target_name_override", _name_of(der, host))])


def client_ssl_context(cert_pem: bytes | None) -> ssl.SSLContext:
    """For HTTPS clients of a coordinator (tests, benchmarks, health checks): trust exactly ``cert_pem``
    (no host name check: the certificate itself is the pin), or the system's roots when None."""
    if cert_pem is None:
        return ssl.create_default_context()
    ctx = ssl.create_default_context(cadata=cert_pem.decode())
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the pinned certificate may come from a CA not given here
    return ctx


def _peer_certificate(host: str, port: int, address: str, *, verify: bool) -> bytes:
    """The certificate the server presents; with ``verify``, only if the system's roots vouch for it under
    ``host`` (else ssl.SSLCertVerificationError)."""
    if verify:
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=HANDSHAKE_TIMEOUT_S) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                return tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        raise
    except ssl.SSLError as e:
        if "WRONG_VERSION_NUMBER" in str(e) or "record layer failure" in str(e):
            raise TrustError(f"the coordinator at {address} does not speak TLS (was it started with --insecure?); "
                             "pass --insecure to talk to it in plaintext") from None
        raise _Unreachable(f"TLS handshake with {address} failed: {e}") from None
    except OSError as e:
        raise _Unreachable(f"cannot connect to {address}: {e}") from None


def _system_trusts(host: str, port: int, address: str) -> bool:
    try:
        _peer_certificate(host, port, address, verify=True)
    except ssl.SSLCertVerificationError:
        return False
    return True


def _self_signed(der: bytes) -> bool:
    from cryptography import x509
    cert = x509.load_der_x509_certificate(der)
    return cert.issuer == cert.subject


def _name_of(der: bytes, host: str = "") -> str:
    """The name to check a pinned certificate under: ``host`` (the address's) if the certificate names it, else
    ours, else its first DNS name, else its first IP address, else its CN."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, ips = san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        dns, ips = [], []
    wanted = host.lower()
    if any(wanted == str(ip) for ip in ips) or any(
            wanted == d.lower() or (d.startswith("*.") and wanted.partition(".")[2] == d[2:].lower()) for d in dns):
        return host  # as sent without a pin: what a proxy routing by SNI expects
    if SERVER_NAME in dns:
        return SERVER_NAME
    if dns:  # where a certificate names itself, its CN is not checked; a wildcard stands for any one label
        return next((d for d in dns if not d.startswith("*.")), dns[0].replace("*", "hivefold", 1))
    if ips:
        return str(ips[0])
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else SERVER_NAME


def _known(path: Path, address: str) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == address:
            return parts[1]
    return None


def _remember(path: Path, address: str, fp: str, *, replace: bool) -> None:
    """Record ``address``'s fingerprint; under a lock, so peers starting together do not lose lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        lines = f.read().splitlines()
        current = [ln for ln in lines if ln.split()[:1] == [address]]
        if current and (not replace or current == [f"{address} {fp}"]):
            return
        kept = [ln for ln in lines if ln.split()[:1] != [address]]
        if not lines:
            kept = ["# hivefold: coordinator address and its certificate's SHA-256 fingerprint (trust on first use)"]
        f.seek(0)
        f.truncate()
        f.write("\n".join([*kept, f"{address} {fp}"]) + "\n")
