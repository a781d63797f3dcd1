"""deploy/k8s: the manifests parse, the coordinator keeps its workdir and is probed where it serves its status, and
the peers run valid commands pointing at its Service (see test_deploy.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hivefold.netaddr import parse_host_port
from tests.unit.deploy_cases import (
    K8S,
    STATUS_PATH,
    Command,
    assert_reachable,
    hivefold_args,
    image_stage,
    parse_hivefold,
    substitute,
)

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
