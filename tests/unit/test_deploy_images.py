"""deploy/'s Dockerfile and compose file: every command an image or service runs passes hivefold's own parser and
validation, and what they expose, publish and health-check is what those commands listen on (see test_deploy.py)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex

import yaml

from hivefold.netaddr import parse_host_port
from tests.conftest import REPO
from tests.unit.deploy_cases import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    TARGETS,
    Command,
    Stage,
    assert_health_check_asks_status,
    assert_reachable,
    dockerfile_stages,
    hivefold_args,
    image_stage,
    parse_hivefold,
    substitute,
)


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
