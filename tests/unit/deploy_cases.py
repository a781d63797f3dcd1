"""What the deploy/ tests share (test_deploy*.py): the files under test, and parsing the commands, Dockerfile
stages and README blocks they check, with hivefold's own parsers."""

from __future__ import annotations

import json
import re
import shlex
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.config import config_from_args as coordinator_config
from hivefold.cli import build_parser
from hivefold.errors import ConfigError
from hivefold.netaddr import parse_host_port
from peer.config import config_from_args as peer_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "hivefold-peer.service"
K8S = DEPLOY / "k8s"
README = DEPLOY / "README.md"
TARGETS = ("coordinator", "peer", "peer-cuda")  # the images an operator builds
PENDING_FILES = {"deploy/grafana-dashboard.json"}  # named by the README, added by its own change
STATUS_PATH = "/api/status"
LOOPBACK = ("127.", "localhost", "::1")
# Sample values for placeholders in commands (compose/shell ${VAR}, Kubernetes $(VAR)) that neither a default
# (${VAR:-default}) nor the container's env gives; a placeholder with no value at all fails the test.
SAMPLES = {"HOSTNAME": "volunteer-host"}


# ---------------------------------------------------------------------------------------------------------------
# Commands: parse with the real parser, then the validation `hivefold coordinator|peer` runs before anything else.

@dataclass
class Command:
    where: str
    args: list[str]
    ns: Namespace
    config: object  # CoordinatorConfig | PeerConfig | None

    def listening(self) -> dict[int, str]:
        """TCP ports this command listens on (ephemeral ones left out) -> the host it binds each to."""
        ports: dict[int, str] = {}
        if self.config is None:  # an operator's command (invite, ban, pause...): it listens on nothing
            return ports
        if self.ns.command == "coordinator":
            for flag, value in (("--listen", self.config.listen), ("--http", self.config.http)):
                if value:
                    host, port = parse_host_port(value, flag=flag)
                    ports[port] = host
        if self.ns.command in ("coordinator", "peer"):
            for maddr in self.config.dht_listen:
                parts = maddr.split("/")
                if "tcp" in parts and int(parts[parts.index("tcp") + 1]) != 0:
                    ports[int(parts[parts.index("tcp") + 1])] = parts[2]
        return ports

    def port_of(self, flag: str) -> int:
        return parse_host_port(getattr(self.config, flag), flag="--" + flag)[1]


def parse_hivefold(args: list[str], where: str) -> Command:
    try:
        parser = build_parser()
        ns = parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `hivefold {shlex.join(args)}` is refused by hivefold's argument parser "
                    f"(exit {e.code}; its message is in the captured stderr)")
    # Spelled out in full: argparse also takes a unique prefix (--no-prog), which a later flag can make ambiguous.
    command = parser._subparsers._group_actions[0].choices[ns.command]
    nested = getattr(ns, f"{ns.command}_command", None)  # hivefold coordinator invite|ban, peer pause|resume...
    if nested:
        command = command._subparsers._group_actions[0].choices[nested]
    options = command._option_string_actions
    for token in args:
        if token.startswith("--") and token.split("=")[0] not in options:
            pytest.fail(f"{where}: `hivefold {shlex.join(args)}`: {token} is not a flag of `hivefold {ns.command}`")
    validate = None if nested else {"coordinator": coordinator_config, "peer": peer_config}.get(ns.command)
    try:
        config = validate(ns) if validate else None
    except ConfigError as e:
        pytest.fail(f"{where}: `hivefold {shlex.join(args)}`: {e}")
    return Command(where, args, ns, config)


def substitute(text: str, where: str, env: dict[str, str] | None = None) -> str:
    """${VAR}, ${VAR:-default} and $(VAR) replaced by ``env`` or SAMPLES values."""
    values = {**SAMPLES, **(env or {})}

    def value(m: re.Match) -> str:
        name, default = m.group("name") or m.group("k8s"), m.group("default")
        if name in values:
            return values[name]
        if default is not None:
            return default
        pytest.fail(f"{where}: no sample value for the placeholder {m.group(0)}")

    return re.sub(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}|\$\((?P<k8s>\w+)\)", value, text)


def hivefold_args(argv: list[str]) -> list[str] | None:
    """The arguments after the ``hivefold`` executable in a container's entrypoint + command, or None."""
    for i, token in enumerate(argv):
        if token == "hivefold" or token.endswith("/hivefold"):
            return argv[i + 1:]
    return None


def loopback(host: str) -> bool:
    return host.startswith(LOOPBACK)


def assert_reachable(cmd: Command, ports: list[int], what: str) -> None:
    """Each port is one the command listens on, bound to an address other containers and the host can reach."""
    listening = cmd.listening()
    for port in ports:
        assert port in listening, (f"{cmd.where}: {what} port {port}, but `hivefold {shlex.join(cmd.args)}` "
                                   f"listens on {sorted(listening) or 'no fixed port'}")
        assert not loopback(listening[port]), (f"{cmd.where}: {what} port {port}, but the command binds it to "
                                               f"{listening[port]}, unreachable from outside the container")


# ---------------------------------------------------------------------------------------------------------------
# Dockerfile: instructions, stages (with what a stage inherits from the stage it is built FROM).

@dataclass
class Stage:
    name: str
    base: str
    parent: Stage | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, instruction: str) -> str | None:
        for name, rest in reversed(self.instructions):
            if name == instruction:
                return rest
        return self.parent.last(instruction) if self.parent else None

    def all(self, instruction: str) -> list[str]:
        own = [rest for name, rest in self.instructions if name == instruction]
        return (self.parent.all(instruction) if self.parent else []) + own

    def exec_form(self, instruction: str) -> list[str]:
        rest = self.last(instruction)
        assert rest is not None, f"Dockerfile target {self.name}: no {instruction}"
        try:  # the exec form: hivefold is the process that gets SIGTERM, not a /bin/sh -c around it
            value = json.loads(rest)
        except json.JSONDecodeError:
            value = None
        assert isinstance(value, list), f"Dockerfile target {self.name}: {instruction} {rest} is not in exec form"
        return value

    def command(self) -> Command:
        argv = self.exec_form("ENTRYPOINT") + self.exec_form("CMD")
        args = hivefold_args(argv)
        assert args is not None, f"Dockerfile target {self.name} runs {argv}, not hivefold"
        return parse_hivefold(args, f"Dockerfile target {self.name}")

    def volumes(self) -> list[str]:
        out = []
        for rest in self.all("VOLUME"):
            out += json.loads(rest) if rest.startswith("[") else rest.split()
        return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):  # comments, also inside a continued instruction
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        name, _, rest = (buf + s).partition(" ")
        out.append((name.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current = None
    for name, rest in dockerfile_instructions(path.read_text()):
        if name == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, f"{path}: cannot read FROM {rest}"
            current = Stage(m.group(2) or f"#{len(stages)}", m.group(1), stages.get(m.group(1)))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append((name, rest))
    return stages


def image_stage(image: str, where: str) -> Stage:
    """Images are named hivefold-<Dockerfile target>[:tag], optionally behind a registry."""
    name = image.rsplit("/", 1)[-1].split(":")[0]
    stages = dockerfile_stages()
    assert name.startswith("hivefold-") and name[len("hivefold-"):] in TARGETS, \
        f"{where}: image {image} is not hivefold-<target> for a target of deploy/Dockerfile ({', '.join(TARGETS)})"
    return stages[name[len("hivefold-"):]]


def healthcheck_url(code: str, where: str) -> tuple[str, str, int, str]:
    m = re.search(r"(https?)://([^:/'\"]+):(\d+)(/[^'\"\s]*)", code)
    assert m, f"{where}: the health check asks no http(s)://HOST:PORT/PATH URL: {code}"
    return m.group(1), m.group(2), int(m.group(3)), m.group(4)


def assert_health_check_asks_status(argv: list[str], cmd: Command, where: str) -> None:
    """A health check ``python -c CODE`` that compiles and asks the coordinator's own /api/status."""
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, f"{where}: expected python -c CODE, got {argv}"
    compile(argv[2], where, "exec")
    scheme, host, port, path = healthcheck_url(argv[2], where)
    assert scheme == ("http" if cmd.config.insecure else "https"), \
        f"{where}: the health check asks {scheme}:// of a coordinator with insecure={cmd.config.insecure}"
    if not cmd.config.insecure:  # verified against the certificate the coordinator serves, not skipped
        cert = cmd.config.tls_cert or cmd.config.workdir / "tls" / "cert.pem"
        assert f"cafile='{cert}'" in argv[2], f"{where}: the health check does not trust {cert}: {argv[2]}"
    http_host, http_port = parse_host_port(cmd.config.http, flag="--http") if cmd.config.http else ("", 0)
    assert (port, path) == (http_port, STATUS_PATH), \
        f"{where}: the health check asks {host}:{port}{path}; the coordinator serves {STATUS_PATH} on " \
        f"--http {cmd.config.http!r}"
    assert loopback(host) and (http_host == "0.0.0.0" or loopback(http_host)), \
        f"{where}: a check inside the container asks {host}, the coordinator binds --http {http_host}"


def fenced_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", README.read_text(), re.MULTILINE | re.DOTALL)
