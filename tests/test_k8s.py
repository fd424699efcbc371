"""The Kubernetes manifests (deploy/k8s) cannot be applied here: check them against the
code, and against the Kubernetes API schemas offline (kubernetes-validate)."""

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from django.conf import settings

from tests.helpers import (
    GATEWAY_IMAGE,
    IMAGES,
    QUEUES,
    REPO,
    SHOP_IMAGE,
    dockerfile_stages,
    image_files,
    longest_time_limit,
    variables_in_example,
)

K8S = REPO / "deploy" / "k8s"
CUSTOM_KINDS = {"ScaledObject"}  # KEDA's: no schema in kubernetes-validate
SECRET_KEYS = {"SECRET_KEY", "DATABASE_URL", "FLOWER_BASIC_AUTH", "FLOWER_COOKIE_SECRET"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in documents(K8S / name)]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment["spec"]["template"]["spec"])


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [only] = pod(workload)["containers"]
    return dict(only)


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return of_kind(objects, "Deployment") | of_kind(objects, "Job")


def workers(objects: list[dict[str, Any]]) -> dict[str, str]:
    """Worker Deployment -> the queue it consumes."""
    return {
        name: container(d)["command"][1]
        for name, d in of_kind(objects, "Deployment").items()
        if container(d)["command"][0] == "deploy/bin/worker"
    }


def test_the_kustomization_lists_every_manifest():
    listed = documents(K8S / "kustomization.yaml")[0]["resources"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert sorted(listed) == sorted(files)


def test_every_object_is_valid_for_the_kubernetes_api(objects):
    version = "1.31.0"
    checked = 0
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises when invalid
        checked += 1

    assert checked >= 15


def test_a_broken_manifest_is_caught_by_the_schema_check(objects):
    broken = yaml.safe_load(yaml.safe_dump(of_kind(objects, "Deployment")["web"]))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty"

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31.0", strict=True)


def test_each_declared_queue_has_exactly_one_worker_deployment(objects):
    assert sorted(workers(objects).values()) == sorted(QUEUES)


def test_every_command_and_exec_probe_runs_a_start_script_its_image_holds(objects):
    for name, workload in workloads(objects).items():
        spec = container(workload)
        commands = [spec["command"]]
        if probe := spec.get("livenessProbe", {}).get("exec"):
            commands.append(probe["command"])
        for command in commands:
            assert command[0].startswith("deploy/bin/"), (name, command)
            assert command[0] in image_files(IMAGES[spec["image"]]), (name, command)


def test_the_gateway_runs_its_own_image_and_every_role_of_the_shop_the_shops(objects):
    kustomization = documents(K8S / "kustomization.yaml")[0]
    images = {name: container(workload)["image"] for name, workload in workloads(objects).items()}

    assert images.pop("gateway") == GATEWAY_IMAGE
    assert set(images.values()) == {SHOP_IMAGE}
    assert {image["name"] for image in kustomization["images"]} == set(IMAGES)


def test_each_worker_outlasts_its_queues_longest_task_and_is_probed_and_bounded(objects):
    deployments = of_kind(objects, "Deployment")
    for name, queue in workers(objects).items():
        needed = longest_time_limit(queue) + settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT
        spec = container(deployments[name])

        assert pod(deployments[name])["terminationGracePeriodSeconds"] > needed, name
        assert spec["livenessProbe"]["exec"]["command"] == ["deploy/bin/worker-alive", queue]
        assert spec["livenessProbe"]["timeoutSeconds"] >= 10  # a ping waits up to 10 s
        assert "--concurrency" in spec["command"]
        assert set(spec["resources"]) == {"requests", "limits"}


def test_beat_runs_once_and_never_two_at_a_time(objects):
    beats = [
        d
        for d in of_kind(objects, "Deployment").values()
        if container(d)["command"][0] == "deploy/bin/beat"
    ]

    assert len(beats) == 1
    assert beats[0]["spec"]["replicas"] == 1
    assert beats[0]["spec"]["strategy"]["type"] == "Recreate"


def test_web_is_probed_on_healthz_and_readyz_and_served(objects):
    web = container(of_kind(objects, "Deployment")["web"])

    assert web["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert web["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert of_kind(objects, "Service")["web"]["spec"]["selector"] == {
        "app.kubernetes.io/name": "web"
    }


def test_selectors_of_services_and_budgets_match_pods(objects):
    deployments = of_kind(objects, "Deployment").values()
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]
    selectors = [s["spec"]["selector"] for s in of_kind(objects, "Service").values()]
    selectors += [
        b["spec"]["selector"]["matchLabels"]
        for b in of_kind(objects, "PodDisruptionBudget").values()
    ]

    for selector in selectors:
        assert any(selector.items() <= pod_labels.items() for pod_labels in labels), selector
    budgeted = {b["metadata"]["name"] for b in of_kind(objects, "PodDisruptionBudget").values()}
    assert {"web", *workers(objects)} <= budgeted


def test_each_worker_is_scaled_by_keda_on_its_own_queue(objects):
    scaled = of_kind(objects, "ScaledObject")
    [config] = of_kind(objects, "ConfigMap").values()
    broker = urlsplit(config["data"]["CELERY_BROKER_URL"])

    assert set(scaled) == set(workers(objects))
    for name, queue in workers(objects).items():
        [trigger] = scaled[name]["spec"]["triggers"]
        assert scaled[name]["spec"]["scaleTargetRef"]["name"] == name
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue
        # the broker the workers consume, not another Redis
        assert trigger["metadata"]["address"] == broker.netloc
        assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/")
        assert int(trigger["metadata"]["listLength"]) > 0


def test_every_variable_the_manifests_set_is_one_the_project_reads(objects):
    known = variables_in_example()
    [config] = of_kind(objects, "ConfigMap").values()
    names = set(config["data"])
    for name, workload in workloads(objects).items():
        spec = container(workload)
        names |= {variable["name"] for variable in spec.get("env", [])}
        sources = {ref for source in spec.get("envFrom", []) for ref in source}
        # every role of the shop reads the settings; the gateway stands alone (stdlib only)
        expected = set() if name == "gateway" else {"configMapRef", "secretRef"}
        assert sources == expected, name

    assert names <= known
    assert not names & SECRET_KEYS  # secrets come from the Secret, never from a manifest
    assert known >= SECRET_KEYS


def test_flower_is_read_only_and_authenticated_from_the_secret(objects):
    flower = container(of_kind(objects, "Deployment")["flower"])

    assert {"name": "FLOWER_READ_ONLY", "value": "true"} in flower["env"]
    assert {"secretRef": {"name": "shop-secrets"}} in flower["envFrom"]
    # it listens on every address (LISTEN_HOST unset), where its script refuses to start
    # without a password (tests/test_start_scripts.py runs that refusal)
    [config] = of_kind(objects, "ConfigMap").values()
    assert "LISTEN_HOST" not in config["data"]
    assert "LISTEN_HOST" not in {variable["name"] for variable in flower["env"]}


def test_every_pod_runs_as_the_images_non_root_user(objects):
    for stage in IMAGES.values():
        [user] = [line.split()[1] for line in dockerfile_stages()[stage] if line[:5] == "USER "]

        assert user.isdigit(), stage  # a name would fail runAsNonRoot: kubelet cannot verify it
    for name, workload in workloads(objects).items():
        assert pod(workload)["securityContext"] == {"runAsNonRoot": True}, name


def test_only_web_and_workers_are_given_a_metrics_folder_and_it_is_a_volume(objects):
    [config] = of_kind(objects, "ConfigMap").values()
    assert "PROMETHEUS_MULTIPROC_DIR" not in config["data"]
    for name, workload in workloads(objects).items():
        spec = container(workload)
        folder = {v["name"]: v.get("value") for v in spec.get("env", [])}.get(
            "PROMETHEUS_MULTIPROC_DIR"
        )
        if folder is None:
            continue
        assert spec["command"][0] in ("deploy/bin/web", "deploy/bin/worker"), name
        assert {"name": "metrics", "mountPath": folder} in spec["volumeMounts"], name


def connections(command: list[str]) -> int:
    """The database connections one replica may hold: each pool thread or child, and each
    process's outbox publishing thread (jobs/outbox.py)."""
    options = dict(zip(command[1::2], command[2::2], strict=False))
    if command[0] == "deploy/bin/worker":
        slots = int(command[command.index("--concurrency") + 1])
        return slots + 1 if "threads" in command else slots * 2
    if command[0] == "deploy/bin/web":
        return int(options["--workers"]) * (int(options["--threads"]) + 1)
    return {"deploy/bin/beat": 1}.get(command[0], 0)  # flower and the gateway: none


def test_the_connections_the_shop_holds_at_full_scale_are_the_ones_scaling_yaml_states(objects):
    """Every thread of a worker keeps its database connection once it ran a task, idle or
    not; at KEDA's maximum the sum is what PostgreSQL must allow (make bench, scenario
    11, ran out with 24 idle threads too many). The number the manifests state is the sum,
    and the threads pools are scaled no further than their dependency's shared limit
    can use."""
    scaled = of_kind(objects, "ScaledObject")
    total = 0
    for name, deployment in of_kind(objects, "Deployment").items():
        spec = scaled[name]["spec"] if name in scaled else deployment["spec"]
        most = spec.get("maxReplicaCount", spec.get("replicas"))
        total += most * connections(container(deployment)["command"])
    stated = re.search(r"at most (\d+) database connections", (K8S / "scaling.yaml").read_text())

    assert stated, "scaling.yaml must say how many database connections the shop holds"
    assert int(stated[1]) == total
    for name in ("worker-payments", "worker-emails"):
        assert scaled[name]["spec"]["maxReplicaCount"] <= 3, name
