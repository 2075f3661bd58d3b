"""The cluster configs that can't be run here: the AWS launcher YAML (checked against the schema
inside the ray package and Ray's own config validation), the KubeRay manifests (required fields,
names/labels/selectors that must agree, resources, images, secrets, exposure), the Dockerfiles
(install what pyproject.toml pins, bake in no secrets) and the re-evaluation crontab."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PROJECT_IMAGE = f"registry.example.com/morphmlp:{VERSION}"
# The Secrets the README tells users to create; manifests reference these and nothing else.
SECRETS = {"morphmlp-ray-token", "morphmlp-s3-credentials", "morphmlp-mlflow-db"}
SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def pinned(requirement_name: str) -> str:
    """The version pyproject.toml pins a dependency to (`name==X` or `name[extras]==X`)."""
    for req in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{re.escape(requirement_name)}(\[[^\]]*\])?==(\S+)", req)
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {requirement_name}")


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"image {image!r} has no tag"
    return name.split(":", 1)[1]


# ---------------------------------------------------------------------------------------------
# AWS: cluster/aws.yaml


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_aws_config_matches_the_launcher_schema_in_the_ray_package(aws):
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(aws, json.loads(schema_path.read_text()))
    # What `ray up` runs before touching AWS: defaults merged, node types and limits checked.
    validate_config(prepare_config(aws))


def test_aws_node_types_and_autoscaling_limits(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # drivers only: no tasks on the head
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    decode = [t for t in workers.values() if "GPU" not in t["resources"]]
    assert [t["node_config"]["InstanceType"] for t in gpu] == ["p5.48xlarge"]
    assert gpu[0]["resources"]["GPU"] == 8
    assert decode and all(t["resources"]["decode"] > 0 for t in decode)
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
        assert t["resources"].get("decode", 0) <= t["resources"]["CPU"]
    assert sum(t["max_workers"] for t in workers.values()) <= aws["max_workers"]


def test_aws_token_auth_image_and_mlflow_come_from_the_environment(aws):
    options = dict(
        opt.removeprefix("--env ").split("=", 1)
        for opt in aws["docker"]["run_options"]
        if opt.startswith("--env ")
    )
    assert options["RAY_AUTH_MODE"] == "token"
    # The token file is copied in by file_mounts from the user's machine, not written here.
    assert options["RAY_AUTH_TOKEN_PATH"] in aws["file_mounts"]
    assert "RAY_AUTH_TOKEN" not in options
    assert urlparse(options["MLFLOW_TRACKING_URI"]).scheme == "http"
    assert aws["docker"]["image"] == PROJECT_IMAGE


def test_aws_job_server_is_never_public(aws):
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for rule in aws["provider"].get("security_group", {}).get("IpPermissions", []):
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert not {"0.0.0.0/0", "::/0"} & set(cidrs) or rule["FromPort"] == rule["ToPort"] == 22


# ---------------------------------------------------------------------------------------------
# KubeRay: cluster/kuberay/


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


MANIFESTS = load_manifests()


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in MANIFESTS if doc["kind"] == kind]


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(where, pod labels, pod spec) of every pod template in the manifests."""
    pods = []
    for cluster in of_kind("RayCluster"):
        head = cluster["spec"]["headGroupSpec"]["template"]
        pods.append(("head", head["metadata"]["labels"], head["spec"]))
        for group in cluster["spec"]["workerGroupSpecs"]:
            template = group["template"]
            pods.append((group["groupName"], template["metadata"]["labels"], template["spec"]))
    for deployment in of_kind("Deployment"):
        template = deployment["spec"]["template"]
        pods.append(
            (deployment["metadata"]["name"], template["metadata"]["labels"], template["spec"])
        )
    for cron in of_kind("CronJob"):
        template = cron["spec"]["jobTemplate"]["spec"]["template"]
        pods.append((cron["metadata"]["name"], template["metadata"]["labels"], template["spec"]))
    return pods


def containers() -> list[tuple[str, dict]]:
    return [(where, c) for where, _, spec in pod_specs() for c in spec["containers"]]


def env_value(container: dict, name: str) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == name)


def walk(node, path=""):
    """Every (path, key, value) in a nested YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_every_manifest_has_the_fields_its_kind_requires():
    kinds = {doc["kind"] for _, doc in MANIFESTS}
    assert {"RayCluster", "RayJob", "CronJob", "Deployment", "Service", "NetworkPolicy"} <= kinds
    for name, doc in MANIFESTS:
        assert doc["apiVersion"] and doc["kind"], name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], name
    for cluster in of_kind("RayCluster"):
        assert cluster["apiVersion"] == "ray.io/v1"
        assert cluster["spec"]["rayVersion"] == pinned("ray")
        assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for group in cluster["spec"]["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert group["template"]["spec"]["containers"]
    for job in of_kind("RayJob"):
        assert job["spec"]["entrypoint"].startswith("python jobs/train.py ")
        # Either its own cluster or an existing one, never both.
        assert ("clusterSelector" in job["spec"]) != ("rayClusterSpec" in job["spec"])
    for cron in of_kind("CronJob"):
        assert len(cron["spec"]["schedule"].split()) == 5
        assert cron["spec"]["concurrencyPolicy"] == "Forbid"
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in {"Never", "OnFailure"}
    for deployment in of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()


def test_the_kustomization_applies_every_standing_manifest():
    kustomization = of_kind("Kustomization")[0]
    standing = {name for name, doc in MANIFESTS if doc["kind"] not in {"Kustomization", "RayJob"}}
    assert set(kustomization["resources"]) == standing


def test_names_labels_and_selectors_agree():
    (cluster,) = of_kind("RayCluster")
    cluster_name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")

    # The training RayJob runs on this RayCluster (KubeRay labels its pods ray.io/cluster).
    for job in of_kind("RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}

    # The CronJob submits to the head Service KubeRay creates: <cluster>-head-svc.
    (cron,) = of_kind("CronJob")
    (submit,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert submit["command"][:3] == ["ray", "job", "submit"]
    address = next(a for a in submit["command"] if a.startswith("--address="))
    url = urlparse(address.removeprefix("--address="))
    assert (url.hostname, url.port) == (f"{cluster_name}-head-svc", dashboard_port)
    entrypoint = submit["command"][submit["command"].index("--") + 1 :]
    assert entrypoint[:2] == ["python", "jobs/reevaluate.py"] and "--catalog" in entrypoint

    # MLflow: its Service selects the Deployment's pods; Ray pods use the Service's address.
    (deployment,) = of_kind("Deployment")
    (service,) = of_kind("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (mlflow,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in mlflow["ports"]}
    service_port = service["spec"]["ports"][0]
    assert service_port["targetPort"] in port_names
    for where, container in containers():
        if container["name"].startswith("ray-"):
            url = urlparse(env_value(container, "MLFLOW_TRACKING_URI"))
            assert (url.hostname, url.port) == (
                service["metadata"]["name"],
                service_port["port"],
            ), where

    # Each NetworkPolicy protects pods that exist: KubeRay's label, or the MLflow pods' labels.
    for policy in of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert (
            selector == {"ray.io/cluster": cluster_name} or selector.items() <= pod_labels.items()
        )
        # From pods of the same namespace only: no namespaceSelector, no ipBlock.
        assert all(rule["from"] == [{"podSelector": {}}] for rule in policy["spec"]["ingress"])


def test_train_rayjob_config_resolves_and_asks_for_a_resource_the_cluster_offers():
    import importlib.util

    from morphmlp.train.config import resolve_config

    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    (job,) = of_kind("RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    cfg = resolve_config(train.config_tree(train.parse_args(words[2:])))  # raises if invalid
    assert cfg.data.decode_resource is not None
    (cluster,) = of_kind("RayCluster")
    offered = {
        name for group in cluster["spec"]["workerGroupSpecs"] for name in group.get("resources", {})
    }
    assert cfg.data.decode_resource in offered, offered


def test_resources_are_requested_and_gpu_groups_ask_for_gpus():
    for where, container in containers():
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][part].keys(), where
    (cluster,) = of_kind("RayCluster")
    gpu_groups = 0
    for group in cluster["spec"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        gpus = {
            part: container["resources"][part].get("nvidia.com/gpu")
            for part in ("requests", "limits")
        }
        if group["groupName"] == "gpu":
            gpu_groups += 1
            assert gpus["requests"] == gpus["limits"] == "8"
        else:
            assert gpus == {"requests": None, "limits": None}
            assert int(group["resources"]["decode"]) <= int(container["resources"]["limits"]["cpu"])
    assert gpu_groups == 1


def test_images_are_pinned():
    for where, container in containers():
        assert image_tag(container["image"]) not in {"", "latest"}, where
        if container["name"].startswith("ray-") or container["name"] == "submit":
            assert container["image"] == PROJECT_IMAGE, where
        else:
            assert image_tag(container["image"]) == pinned("mlflow"), where


def test_secrets_are_referenced_never_inlined():
    assert not of_kind("Secret"), "no Secret manifests: values would be committed"
    referenced = set()
    for name, doc in MANIFESTS:
        for path, key, value in walk(doc):
            if key in {"secretKeyRef", "secretRef"}:
                referenced.add(value["name"])
            if key == "secretName":
                referenced.add(value)
            if key == "env":
                for var in value:
                    if SECRET_LIKE.search(var["name"]):
                        assert "value" not in var, f"{name}{path}: {var['name']} inline"
            if isinstance(value, str):
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", value), f"{name}{path}: password"
    assert referenced == SECRETS
    # The CronJob reads the very token the RayCluster's auth uses.
    (cluster,) = of_kind("RayCluster")
    (cron,) = of_kind("CronJob")
    (submit,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert env_value(submit, "RAY_AUTH_MODE") == "token"
    token = next(e for e in submit["env"] if e["name"] == "RAY_AUTH_TOKEN")["valueFrom"]
    assert token["secretKeyRef"] == {
        "name": cluster["spec"]["authOptions"]["secretName"],
        "key": "auth_token",  # the key KubeRay reads
    }


def test_dashboard_and_mlflow_are_not_exposed_outside_the_cluster():
    (cluster,) = of_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    for service in of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not of_kind("Ingress")


# ---------------------------------------------------------------------------------------------
# Dockerfiles and the crontab


def dockerfile(path: Path) -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("path", [CLUSTER / "Dockerfile", CLUSTER / "mlflow" / "Dockerfile"])
def test_dockerfiles_pin_their_base_and_bake_in_no_secrets(path):
    lines = dockerfile(path)
    base = lines[0].split()[1]
    assert lines[0].startswith("FROM ") and image_tag(base) != "latest"
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction in {"ENV", "ARG"}:
            assert not SECRET_LIKE.search(rest), line
        if instruction in {"COPY", "ADD"}:
            sources = rest.split()[:-1]
            assert "." not in sources, "copies the whole build context"
            for source in sources:
                assert (REPO / source).exists(), f"{line}: {source} is not in the repository"
                assert ".state" not in source and "token" not in source, line


def test_project_image_installs_what_pyproject_declares():
    lines = dockerfile(CLUSTER / "Dockerfile")
    installs = [shlex.split(line[4:]) for line in lines if line.startswith("RUN pip install")]
    pins = dict(arg.split("==") for words in installs for arg in words if "==" in arg)
    assert pins == {"torch": pinned("torch")}
    # The project itself, from its pyproject.toml, after the sources are in.
    project = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install ."))
    copied = " ".join(line for line in lines[:project] if line.startswith("COPY "))
    assert "pyproject.toml" in copied and "platform" in copied
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "**/.state", ".git"} <= set(ignored)


def test_mlflow_image_matches_the_project_mlflow():
    (install,) = [
        line for line in dockerfile(CLUSTER / "mlflow" / "Dockerfile") if "pip install" in line
    ]
    assert f"mlflow=={pinned('mlflow')}" in install.split()
    # The PostgreSQL backend and S3 artifacts need these; MLflow's package leaves them out.
    assert any(word.startswith("psycopg2-binary==") for word in install.split())
    assert any(word.startswith("boto3==") for word in install.split())


def test_crontab_submits_the_reevaluation_through_the_job_server():
    entries = [
        line
        for line in (CLUSTER / "crontab.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries
    for entry in entries:
        minute, hour, day, month, weekday, command = entry.split(maxsplit=5)
        assert all(re.fullmatch(r"[\d*/,-]+", f) for f in (minute, hour, day, month, weekday))
        words = shlex.split(command)
        submit = words.index("submit")
        assert words[submit - 2 : submit] == ["ray", "job"]
        entrypoint = words[words.index("--", submit) + 1 :]
        assert entrypoint[:2] == ["python", "jobs/reevaluate.py"]
        assert entrypoint[2] == "--catalog" and entrypoint[3]
        assert "flock" in words  # never two re-evaluations at once
