"""Parsing of HOST:PORT arguments, shared by every CLI flag that takes one."""

from __future__ import annotations

from hivefold.errors import ConfigError


def parse_host_port(value: str, *, flag: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6); raise ConfigError naming ``flag`` if malformed."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag} must be HOST:PORT (e.g. 127.0.0.1:7600), got {value!r}")
    return host, int(port)


def with_peer_id(maddr: str, peer_id: str) -> str:
    """``maddr`` ending in ``/p2p/<peer_id>`` (hivemind needs it to bootstrap from an address)."""
    return maddr if "/p2p/" in maddr else f"{maddr.rstrip('/')}/p2p/{peer_id}"
