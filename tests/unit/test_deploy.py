"""deploy/ holds together: the images, the compose file, the systemd unit, the Kubernetes manifests and the README.

No container, cluster or service manager runs here (the test machines have no docker or kubectl), so this checks
what can be checked without them, for real: the YAML parses; every ``hivefold`` command the files run or show (a
Dockerfile's ENTRYPOINT + CMD, compose and Kubernetes commands, the unit's ExecStart, commands in comments and in
the README's shell blocks) passes hivefold's own argument parser and config validation; every port an image
exposes, compose publishes or a Service routes to is one its command listens on, on an address reachable from
outside the container; health checks and probes ask the coordinator's /api/status where it serves it; files the
images copy and paths the docs name exist; the unit keeps a volunteer's peer unprivileged and at low priority, and
passes ``systemd-analyze verify`` where that tool is installed.

This file checks the commands and paths shown in comments and in the README; test_deploy_images.py (Dockerfile,
compose), test_deploy_k8s.py and test_deploy_systemd.py check the rest, with the helpers of deploy_cases.py.
"""

from __future__ import annotations

import re
import shlex

import yaml

from tests.conftest import REPO
from tests.unit.deploy_cases import (
    COMPOSE,
    DOCKERFILE,
    K8S,
    PENDING_FILES,
    README,
    UNIT,
    Stage,
    assert_reachable,
    dockerfile_stages,
    fenced_blocks,
    image_stage,
    parse_hivefold,
    substitute,
)

# ---------------------------------------------------------------------------------------------------------------
# Commands and paths in comments and in the README

COMMAND_STARTS = ("docker", "sudo", "kubectl", "hivefold", "curl", "journalctl")
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "&"}
SWITCHES = {"-d", "--detach", "--rm", "-i", "-t", "-it", "--interactive", "--tty", "--init"}  # take no value


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
