"""deploy/ holds together: the images, the compose file, the systemd unit, the Kubernetes manifests and the README.

No container, cluster or service manager runs here (the test machines have no docker or kubectl), so this checks
what can be checked without them, for real: the YAML parses; every ``hivefold`` command the files run or show (a
Dockerfile's ENTRYPOINT + CMD, compose and Kubernetes commands, the unit's ExecStart, commands in comments and in
the README's shell blocks) passes hivefold's own argument parser and config validation; every port an image
exposes, compose publishes or a Service routes to is one its command listens on, on an address reachable from
outside the container; health checks and probes ask the coordinator's /api/status where it serves it; files the
images copy and paths the docs name exist; the unit keeps a volunteer's peer unprivileged and at low priority, and
passes ``systemd-analyze verify`` where that tool is installed.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

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


def test_dockerfile_targets_run_hivefold_unprivileged_with_their_state_in_a_volume():
    stages = dockerfile_stages()
    for target in TARGETS:
        assert target in stages, f"deploy/Dockerfile has no target {target} (stages: {', '.join(stages)})"
        stage = stages[target]
        user = (stage.last("USER") or "root").split(":")[0]
        assert user not in ("root", "0"), f"Dockerfile target {target} runs as root"
        cmd = stage.command()
        assert cmd.ns.command == ("coordinator" if target == "coordinator" else "peer"), (target, cmd.args)
        workdir = str(cmd.config.workdir)
        assert any(workdir == v or workdir.startswith(v.rstrip("/") + "/") for v in stage.volumes()), \
            f"Dockerfile target {target}: --workdir {workdir} is in no VOLUME ({stage.volumes()})"
        if target == "peer-cuda":
            assert cmd.config.device in ("cuda", "auto"), f"the CUDA image's peer runs on {cmd.config.device}"


def test_dockerfile_exposes_exactly_what_its_commands_listen_on():
    stages = dockerfile_stages()
    for target in TARGETS:
        cmd = stages[target].command()
        exposed = [int(p.split("/")[0]) for rest in stages[target].all("EXPOSE") for p in rest.split()]
        assert_reachable(cmd, exposed, "EXPOSE")
        assert set(cmd.listening()) <= set(exposed), \
            f"Dockerfile target {target} listens on {sorted(cmd.listening())} but exposes {sorted(exposed)}"


def test_coordinator_image_health_check_asks_its_http_status():
    stage = dockerfile_stages()["coordinator"]
    rest = stage.last("HEALTHCHECK")
    assert rest and " CMD " in f" {rest} ", "the coordinator image has no HEALTHCHECK ... CMD"
    argv = json.loads(rest.split("CMD", 1)[1])
    assert_health_check_asks_status(argv, stage.command(), "coordinator image HEALTHCHECK")


def test_dockerfile_copies_every_package_from_the_build_context():
    """COPY sources exist, the context's .dockerignore keeps them, and every package pyproject installs is copied
    (a package left out would install fine and fail at import in the container)."""
    # pyproject's [tool.setuptools.packages.find] include patterns, read without tomllib (Python 3.11+)
    find = re.search(r"^\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[(.*?)\]",
                     (REPO / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL)
    assert find, "pyproject.toml has no [tool.setuptools.packages.find] include = [...]; update this test"
    patterns = re.findall(r'"([^"]+)"', find.group(1))
    packages = {d.name for d in REPO.iterdir() if (d / "__init__.py").is_file()
                and any(fnmatch.fnmatch(d.name, p) for p in patterns)}
    assert {"hivefold", "coordinator", "peer"} <= packages, packages
    needed = packages | {"pyproject.toml", "README.md"}
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        verdict = False  # the last matching pattern decides, as in Docker
        for pattern in ignore:
            negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
                verdict = not negated
        return verdict

    copying = 0
    for stage in dockerfile_stages().values():
        sources = []
        for rest in [r for n, r in stage.instructions if n in ("COPY", "ADD") and not r.startswith("--from=")]:
            words = json.loads(rest) if rest.startswith("[") else rest.split()
            sources += [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile stage {stage.name} copies {source}, not in the repository"
            assert not ignored(source), f"Dockerfile stage {stage.name} copies {source}, which the dockerignore drops"
        if sources:
            copying += 1
            missing = sorted(needed - set(sources))
            assert not missing, f"Dockerfile stage {stage.name} does not copy {missing}"
    assert copying >= 2, "expected a CPU and a CUDA build stage that copy the sources"


# ---------------------------------------------------------------------------------------------------------------
# Compose

def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and doc.get("services"), "deploy/compose.yaml defines no services"
    return doc


def compose_command(name: str, service: dict) -> tuple[Command, Stage]:
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    dockerfile = context / build.get("dockerfile", "Dockerfile")
    assert dockerfile == DOCKERFILE, f"compose service {name} builds {dockerfile}, expected {DOCKERFILE}"
    assert build.get("target") in TARGETS, f"compose service {name} builds target {build.get('target')}"
    stage = image_stage(service["image"], f"compose service {name}")
    assert stage.name == build["target"], f"compose service {name}: image {service['image']}, target {build['target']}"

    def words(value) -> list[str]:
        words = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
        return [substitute(w, f"compose service {name}") for w in words]

    entrypoint = words(service["entrypoint"]) if "entrypoint" in service else stage.exec_form("ENTRYPOINT")
    command = words(service["command"]) if "command" in service else stage.exec_form("CMD")
    args = hivefold_args(entrypoint + command)
    assert args is not None, f"compose service {name} does not run hivefold"
    return parse_hivefold(args, f"compose service {name}"), stage


def compose_port(spec, name: str) -> int:
    if isinstance(spec, dict):
        return int(spec["target"])
    spec = substitute(str(spec), f"compose service {name}").split("/")[0]
    return int(spec.rsplit(":", 1)[-1])


def test_compose_services_run_valid_commands_and_publish_what_they_listen_on():
    doc = compose()
    for name, service in doc["services"].items():
        cmd, _ = compose_command(name, service)
        assert_reachable(cmd, [compose_port(p, name) for p in service.get("ports", [])], "publishes")
        mounts = [str(v).split(":") for v in service.get("volumes", [])]
        assert any(m[1:2] == [str(cmd.config.workdir)] for m in mounts), \
            f"compose service {name}: --workdir {cmd.config.workdir} is not a mounted volume, the run would be lost"
        for m in mounts:
            if not m[0].startswith((".", "/")):
                assert m[0] in (doc.get("volumes") or {}), f"compose service {name} mounts undeclared volume {m[0]}"
        if getattr(cmd.config, "device", None) == "cuda":
            devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            assert any("gpu" in d.get("capabilities", []) for d in devices), f"compose service {name}: no GPU"


def test_compose_peers_wait_for_a_healthy_coordinator_they_can_reach():
    doc = compose()
    commands = {name: compose_command(name, s) for name, s in doc["services"].items()}
    coordinators = [n for n, (c, _) in commands.items() if c.ns.command == "coordinator"]
    assert len(coordinators) == 1, f"expected one coordinator service, got {coordinators}"
    coord, (coord_cmd, coord_stage) = coordinators[0], commands[coordinators[0]]
    service = doc["services"][coord]
    if "healthcheck" in service:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"compose coordinator healthcheck: {test}"
        assert_health_check_asks_status(test[1:], coord_cmd, "compose coordinator healthcheck")
    else:  # the image's HEALTHCHECK, which must then match the command compose runs
        argv = json.loads(coord_stage.last("HEALTHCHECK").split("CMD", 1)[1])
        assert_health_check_asks_status(argv, coord_cmd, "coordinator image HEALTHCHECK under compose")
    peers = [n for n, (c, _) in commands.items() if c.ns.command == "peer"]
    assert len([n for n in peers if not doc["services"][n].get("profiles")]) >= 2, "expected two peers by default"
    for name in peers:
        host, port = parse_host_port(commands[name][0].config.coordinator, flag="--coordinator")
        assert (host, port) == (coord, coord_cmd.port_of("listen")), \
            f"compose service {name} looks for the coordinator at {host}:{port}; it is {coord}, --listen " \
            f"{coord_cmd.config.listen}"
        depends = doc["services"][name].get("depends_on")
        assert isinstance(depends, dict) and depends.get(coord, {}).get("condition") == "service_healthy", \
            f"compose service {name} does not wait for a healthy {coord}: depends_on {depends}"


# ---------------------------------------------------------------------------------------------------------------
# Kubernetes

def manifests() -> list[tuple[Path, dict]]:
    files = sorted(K8S.glob("*.yaml"))
    assert files, "deploy/k8s holds no manifests"
    out = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def objects(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc.get("kind") == kind]


def container_command(pod: dict, where: str) -> tuple[dict, Command]:
    containers = pod["spec"]["containers"]
    assert len(containers) == 1, f"{where}: expected one container"
    c = containers[0]
    stage = image_stage(c["image"], where)
    env = {e["name"]: str(e.get("value", "sample-" + e["name"].lower())) for e in c.get("env", [])}

    def words(key: str, default: list[str]) -> list[str]:
        if key not in c:
            return default
        for value in c[key]:
            for var in re.findall(r"\$\((\w+)\)", str(value)):  # Kubernetes leaves an undefined $(VAR) as it is
                assert var in env, f"{where}: {key} uses $({var}), which the container's env does not define"
        return [substitute(str(v), where, env) for v in c[key]]

    argv = words("command", stage.exec_form("ENTRYPOINT")) + words("args", stage.exec_form("CMD"))
    args = hivefold_args(argv)
    assert args is not None, f"{where}: the container does not run hivefold: {argv}"
    return c, parse_hivefold(args, where)


def container_port(c: dict, port, where: str) -> int:
    for p in c.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return p["containerPort"]
    pytest.fail(f"{where}: port {port!r} names no port of the container")


def test_k8s_manifests_parse_and_the_kustomization_lists_them():
    docs = manifests()
    for path, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), f"{path.name}: not a Kubernetes object: {list(doc)}"
        assert doc["kind"] == "Kustomization" or doc.get("metadata", {}).get("name"), f"{path.name}: unnamed object"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, f"kustomization lists {listed}"
    used = {c["image"].split(":")[0] for _, d in docs if d["kind"] in ("StatefulSet", "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"]}
    assert {i["name"] for i in kustomization.get("images", [])} <= used, "kustomization rewrites an unused image"


def test_k8s_coordinator_is_a_statefulset_with_a_persistent_workdir_and_status_probes():
    sets = objects("StatefulSet")
    assert len(sets) == 1, f"expected one StatefulSet (the coordinator), got {len(sets)}"
    sts = sets[0]
    where = f"StatefulSet {sts['metadata']['name']}"
    assert sts["spec"].get("replicas", 1) == 1, f"{where}: one coordinator holds a workdir"
    assert sts["spec"]["serviceName"] in [s["metadata"]["name"] for s in objects("Service")], \
        f"{where}: serviceName {sts['spec']['serviceName']} is no Service of deploy/k8s"
    c, cmd = container_command(sts["spec"]["template"], where)
    assert cmd.ns.command == "coordinator", f"{where} runs {cmd.args}"
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert mounts.get(str(cmd.config.workdir)) in claims, \
        f"{where}: --workdir {cmd.config.workdir} is not on a volumeClaimTemplate ({claims}), mounts {mounts}"
    declared = [p["containerPort"] for p in c.get("ports", [])]
    assert_reachable(cmd, declared, "declares container")
    assert set(cmd.listening()) <= set(declared), f"{where}: listens on {sorted(cmd.listening())}, declares {declared}"
    for probe in ("readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet")
        assert get, f"{where}: no {probe} over HTTP"
        assert get["path"] == STATUS_PATH and container_port(c, get["port"], where) == cmd.port_of("http"), \
            f"{where}: {probe} asks {get}; the coordinator serves {STATUS_PATH} on --http {cmd.config.http}"
        assert get.get("scheme", "HTTP") == ("HTTP" if cmd.config.insecure else "HTTPS"), \
            f"{where}: {probe} asks {get.get('scheme', 'HTTP')}; the coordinator serves TLS unless --insecure"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    services = [s for s in objects("Service") if s["spec"].get("clusterIP") != "None"
                and s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]
    assert len(services) == 1, f"expected one Service in front of the coordinator, got {len(services)}"
    routed = [container_port(c, p.get("targetPort", p["port"]), "Service " + services[0]["metadata"]["name"])
              for p in services[0]["spec"]["ports"]]
    assert set(routed) == set(cmd.listening()), \
        f"the coordinator Service routes to {sorted(routed)}, the coordinator listens on {sorted(cmd.listening())}"


def test_k8s_peers_are_gpu_pods_pointing_at_the_coordinator_service():
    (coordinator,) = objects("StatefulSet")
    coord_c, coord_cmd = container_command(coordinator["spec"]["template"], "coordinator StatefulSet")
    labels = coordinator["spec"]["template"]["metadata"]["labels"]
    peers = objects("Deployment")
    assert peers, "deploy/k8s has no Deployment of peers"
    for dep in peers:
        where = f"Deployment {dep['metadata']['name']}"
        c, cmd = container_command(dep["spec"]["template"], where)
        assert cmd.ns.command == "peer", f"{where} runs {cmd.args}"
        assert str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) == "1", f"{where}: no GPU limit"
        assert cmd.config.device in ("cuda", "auto"), f"{where}: GPU pods training on {cmd.config.device}"
        host, port = parse_host_port(cmd.config.coordinator, flag="--coordinator")
        service = next((s for s in objects("Service") if s["metadata"]["name"] == host.split(".")[0]), None)
        assert service and service["spec"]["selector"].items() <= labels.items(), \
            f"{where}: --coordinator {host} is not a Service of the coordinator"
        ports = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
        assert port in ports and container_port(coord_c, ports[port], host) == coord_cmd.port_of("listen"), \
            f"{where}: {host}:{port} does not reach the coordinator's gRPC port {coord_cmd.config.listen}"


# ---------------------------------------------------------------------------------------------------------------
# systemd

def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key several times (Environment=)."""
    out, section = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        if s.startswith("["):
            section = s.strip("[]")
            continue
        key, sep, value = s.partition("=")
        assert sep, f"hivefold-peer.service: not KEY=VALUE: {s}"
        out.append((section, key.strip(), value.strip()))
    return out


def unit_settings(text: str) -> dict[str, str]:
    return {key: value for section, key, value in unit_entries(text) if section == "Service"}


def documented_drop_ins() -> list[str]:
    """The drop-ins the unit's comments and the README tell volunteers to write with `systemctl edit`."""
    in_unit = "\n".join(line.lstrip("#").strip() for line in UNIT.read_text().splitlines()
                        if re.match(r"#\s+(\[Service\]|Environment=)", line))
    in_readme = [block for lang, block in fenced_blocks() if lang == "ini"]
    assert "[Service]" in in_unit and in_readme, "the drop-in setting the coordinator is no longer documented"
    return [in_unit, *in_readme]


def exec_start(text: str) -> list[str]:
    """ExecStart as systemd runs it: specifiers, then ${VAR} as one word and $VAR split on spaces."""
    env, specifiers = {}, {"%H": "volunteer-host", "%S": "/var/lib", "%%": "%"}
    for section, key, value in unit_entries(text):
        if section == "Service" and key == "Environment":
            for assignment in shlex.split(value):
                name, sep, val = assignment.partition("=")
                assert sep and re.fullmatch(r"[A-Za-z_]\w*", name), f"invalid Environment= assignment {assignment!r}"
                env[name] = re.sub(r"%.", lambda m: specifiers[m.group(0)], val)
    line = re.sub(r"%.", lambda m: specifiers[m.group(0)], unit_settings(text)["ExecStart"]).lstrip("-@+!:")
    argv = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$(\w+)", word)
        name_of = (m.group(1),) if m else re.findall(r"\$\{(\w+)\}", word)
        for name in name_of:
            assert name in env, f"ExecStart uses ${name}, which no Environment= sets"
        if m:
            argv += env[m.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda v: env[v.group(1)], word))
    return argv


def test_systemd_unit_runs_an_unprivileged_low_priority_peer_that_restarts():
    s = unit_settings(UNIT.read_text())
    assert s.get("Restart") in ("on-failure", "always"), f"Restart={s.get('Restart')}"
    assert s.get("DynamicUser") == "yes" and s.get("StateDirectory"), "expected DynamicUser=yes and a StateDirectory"
    assert s.get("User") in (None, ""), "DynamicUser allocates the user"
    assert int(s.get("Nice", 0)) >= 10, f"Nice={s.get('Nice')}: a volunteer's peer yields the CPU"
    assert s.get("CPUSchedulingPolicy") in ("batch", "idle"), f"CPUSchedulingPolicy={s.get('CPUSchedulingPolicy')}"
    assert s.get("IOSchedulingClass") in ("idle", "3"), f"IOSchedulingClass={s.get('IOSchedulingClass')}"
    # control-group (the default) sends SIGTERM to the DHT helpers too, at once: the peer could no longer hand
    # its state to the keeper on the way out.
    assert s.get("KillMode") == "mixed", f"KillMode={s.get('KillMode')}: SIGTERM must reach hivefold alone"
    assert s.get("NoNewPrivileges", "yes") == "yes" and s.get("CapabilityBoundingSet", None) == "", "hardening"


@pytest.mark.parametrize("drop_in", [None, 0, 1], ids=["defaults", "unit-comment-drop-in", "readme-drop-in"])
def test_systemd_exec_start_is_a_valid_peer_command_writing_only_its_state_directory(drop_in):
    text = UNIT.read_text()
    if drop_in is not None:
        text += "\n" + documented_drop_ins()[drop_in]
    argv = exec_start(text)
    assert argv[0].startswith("/") and argv[0].endswith("/hivefold"), f"ExecStart runs {argv[0]}"
    cmd = parse_hivefold(argv[1:], "hivefold-peer.service ExecStart")
    assert cmd.ns.command == "peer"
    state = Path("/var/lib") / unit_settings(text)["StateDirectory"]
    assert cmd.config.workdir == state, f"--workdir {cmd.config.workdir}: the only writable place is {state}"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify refuses a unit whose ExecStart binary is missing, and /opt/hivefold/.venv exists only on a volunteer's
    # machine: verify a copy that differs in that path alone, pointing at the hivefold this test runs with.
    binary = Path(sys.executable).parent / "hivefold"
    if not binary.exists():
        pytest.skip(f"no hivefold executable beside {sys.executable} to stand in for ExecStart's")
    original = UNIT.read_text()
    exe = unit_settings(original)["ExecStart"].split()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(original.replace(f"ExecStart={exe} ", f"ExecStart={binary} "))
    assert f"ExecStart={binary} " in copy.read_text()
    r = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if UNIT.name in line]
    assert r.returncode == 0 and not complaints, f"systemd-analyze verify (exit {r.returncode}):\n{r.stdout}{r.stderr}"


# ---------------------------------------------------------------------------------------------------------------
# Commands and paths in comments and in the README

COMMAND_STARTS = ("docker", "sudo", "kubectl", "hivefold", "curl", "journalctl")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "&"}
SWITCHES = {"-d", "--detach", "--rm", "-i", "-t", "-it", "--interactive", "--tty", "--init"}  # take no value


def fenced_blocks() -> list[tuple[str, str]]:
    return re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", README.read_text(), re.MULTILINE | re.DOTALL)


def shell_commands() -> list[tuple[str, str]]:
    """(where, command line): the README's sh blocks and the commands shown in deploy/'s comments."""
    out = []
    for lang, block in fenced_blocks():
        if lang in ("sh", "bash", "console"):
            out += [("deploy/README.md", line) for line in block.replace("\\\n", " ").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    for path in [DOCKERFILE, COMPOSE, UNIT, *sorted(K8S.glob("*.yaml"))]:
        for line in path.read_text().splitlines():  # commands in comments are indented: `#   docker ...`
            m = re.match(r"\s*#\s{2,}(\S.*)", line)
            if m and m.group(1).split(" ")[0] in COMMAND_STARTS:
                out.append((str(path.relative_to(REPO)), m.group(1)))
    return out


def invocations(line: str, where: str) -> list[tuple[list[str], Stage | None, list[str]]]:
    """Each hivefold run on a command line: (its arguments, the image it runs in if any, ports published).

    ``hivefold`` (or a path ending in it) starts one, unless it is an option's value (``kubectl -n hivefold``);
    so does a hivefold-<target>:<tag> image in ``docker run``, whose arguments are the hivefold command.
    """
    tokens = shlex.split(substitute(line, where), comments=True)
    cut = next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), len(tokens))
    tokens, out, published = tokens[:cut], [], []
    for i, token in enumerate(tokens):
        previous = tokens[i - 1] if i else ""
        if previous in ("-p", "--publish"):
            published.append(int(token.split("/")[0].rsplit(":", 1)[-1]))
        if previous.startswith("-") and previous != "--" and previous not in SWITCHES:
            continue  # an option's value
        if token == "hivefold" or token.endswith("/hivefold"):
            out.append((tokens[i + 1:], None, []))
            break
        if tokens[:2] == ["docker", "run"] and re.fullmatch(r"(?:[\w.-]+/)*hivefold-[\w-]+:[\w.-]+", token):
            out.append((tokens[i + 1:], image_stage(token, where), published))
            break
    return out


def test_every_hivefold_command_in_comments_and_the_readme_parses():
    checked = 0
    for where, line in shell_commands():
        for args, stage, published in invocations(line, where):
            if stage is not None and not args:
                cmd = stage.command()  # the image's own command
            else:
                cmd = parse_hivefold(args, f"{where}: {line}")
            assert_reachable(cmd, published, f"{where}: `{line}` publishes")
            checked += 1
    assert checked >= 10, f"found only {checked} hivefold commands; is the extraction broken?"


def test_readme_states_the_real_default_ports_and_its_yaml_parses():
    text = README.read_text()
    coord = parse_hivefold(["coordinator", "--workdir", "w"], "defaults").config
    peer = parse_hivefold(["peer", "--coordinator", "h:1"], "defaults").config
    for flag, default in (("--listen", coord.listen), ("--http", coord.http), ("--dht-listen", coord.dht_listen[0]),
                          ("peer --dht-listen", peer.dht_listen[0])):
        assert f"`{default}`" in text, f"deploy/README.md does not give {flag}'s default `{default}`"
    yaml_blocks = [block for lang, block in fenced_blocks() if lang in ("yaml", "yml")]
    assert yaml_blocks, "deploy/README.md shows no Prometheus scrape config"
    for block in yaml_blocks:
        doc = yaml.safe_load(block)
        for job in doc.get("scrape_configs", []):
            assert job.get("metrics_path", "/metrics") == "/metrics" and job["static_configs"], job


def test_paths_and_build_targets_named_in_deploy_exist():
    stages = dockerfile_stages()
    texts = {p: p.read_text() for p in [README, DOCKERFILE, COMPOSE, UNIT, *K8S.glob("*.yaml")]}
    for path, text in texts.items():
        for named in re.findall(r"\bdeploy/[\w./-]*\w", text):
            assert (REPO / named).exists() or named in PENDING_FILES, f"{path.name} names {named}, which is missing"
        for target in re.findall(r"--target[ =]([\w-]+)", text):
            assert target in stages, f"{path.name} builds --target {target}, which deploy/Dockerfile lacks"


def test_images_and_docs_install_the_torch_the_makefile_pins():
    """The images and the systemd instructions run the torch that `make` installs and CI tests."""
    pinned = re.search(r"^TORCH \?= torch==(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert pinned, "the Makefile no longer pins torch; update this test"
    for path in [DOCKERFILE, README]:
        versions = re.findall(r"torch==(\d[\w.+]*)|TORCH_VERSION=(\d[\w.+]*)", path.read_text())
        assert versions, f"{path.name} pins no torch"
        for version in {a or b for a, b in versions}:
            assert version == pinned.group(1), f"{path.name} installs torch {version}, the Makefile {pinned.group(1)}"
