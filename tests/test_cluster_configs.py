"""The cluster configs that can't be run here: the AWS launcher YAML (checked against the schema
inside the ray package and Ray's own config validation), the KubeRay manifests (required fields,
names/labels/selectors that must agree, resources, images, secrets, exposure), the Dockerfiles
(install what pyproject.toml pins and what Ray's AWS autoscaler imports, bake in no secrets) and the
re-evaluation schedules (crontab, CronJob): their leaderboard goes to an absolute destination,
object storage by default, and the job writes it there when run as the image runs it (non-root,
read-only application folder), with moto's S3 server and a real MLflow server standing in."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from support import free_port, start_mlflow_server

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


def _distribution(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_aws_autoscaler_runs_in_an_image_with_what_the_aws_node_provider_imports(aws):
    # With `docker:` the head's `ray start --autoscaling-config` runs inside the project image:
    # the autoscaler launching the EC2 workers imports Ray's AWS node provider there.
    assert aws["provider"]["type"] == "aws" and aws["docker"]["image"] == PROJECT_IMAGE
    assert "--autoscaling-config" in " ".join(aws["head_start_ray_commands"])
    provider = Path(ray.autoscaler.__file__).parent / "_private" / "aws"
    imported = set()
    for path in provider.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names}
    assert "boto3" in third_party  # what the provider is made of; the rest must agree with it

    # What the image installs: its `pip install` pins, the project's dependencies, and what
    # each of those requires itself (as installed here, at the same pins).
    lines = dockerfile(CLUSTER / "Dockerfile")
    installed = {
        _distribution(word)
        for line in lines
        if line.startswith("RUN pip install")
        for word in shlex.split(line[4:])
        if "==" in word
    }
    installed |= {_distribution(req) for req in PYPROJECT["project"]["dependencies"]}
    for dist in list(installed):
        for req in importlib.metadata.requires(dist) or []:
            if "extra ==" not in req:
                installed.add(_distribution(req))
    module_dists = importlib.metadata.packages_distributions()
    for module in third_party:
        dists = {d.lower() for d in module_dists.get(module, [module])}
        assert dists & installed, f"the AWS node provider imports {module}; the image lacks it"


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
    # torch at pyproject.toml's pin; boto3 (for the AWS autoscaler) at the MLflow image's.
    (mlflow_install,) = [
        line for line in dockerfile(CLUSTER / "mlflow" / "Dockerfile") if "pip install" in line
    ]
    mlflow_pins = dict(w.split("==") for w in mlflow_install.split() if "==" in w)
    assert pins == {"torch": pinned("torch"), "boto3": mlflow_pins["boto3"]}
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


# ---------------------------------------------------------------------------------------------
# The re-evaluation's leaderboard: where the schedules send it, and the job run as the image
# runs it

_K8S_REF = re.compile(r"\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_REDIRECTION = re.compile(r"\d*[<>]")
# The local-cluster example's shell variable, as cron's shell expands it before submitting.
_CRON_HOME = "/home/someone"


def k8s_expand(word: str, env: dict[str, str]) -> str:
    """`$(NAME)` in a container's command, as Kubernetes expands it from the container's env
    (`$$(` escapes; an undefined name stays as written)."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$(":
            return "$("
        return env.get(match.group(1), match.group(0))

    return _K8S_REF.sub(sub, word)


def container_env(container: dict) -> dict[str, str]:
    """A container's env values: literal, or from a ConfigMap in the manifests (Secrets left
    out: they are never in the repository)."""
    configmaps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind("ConfigMap")}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = k8s_expand(var["value"], env)
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
    return env


def reevaluation_entrypoints() -> dict[str, list[str]]:
    """The command line each schedule runs as the Ray job: the CronJob's (its $(NAME)s expanded),
    the crontab's AWS line, and its commented-out local-cluster example."""
    (cron,) = of_kind("CronJob")
    (submit,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = container_env(submit)
    command = [k8s_expand(word, env) for word in submit["command"]]
    entrypoints = {"kuberay": command[command.index("--") + 1 :]}
    for line in (CLUSTER / "crontab.example").read_text().splitlines():
        example = line.startswith("# ") and re.match(r"# [\d*]", line)
        if not line.strip() or (line.startswith("#") and not example):
            continue
        words = shlex.split(line.removeprefix("# ").split(maxsplit=5)[5])
        words = [w.replace("$HOME", _CRON_HOME) for w in words if not _REDIRECTION.match(w)]
        entrypoint = words[words.index("--", words.index("submit")) + 1 :]
        entrypoints["crontab-local-example" if example else "crontab-aws"] = entrypoint
    return entrypoints


def reevaluate_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reevaluate_job", REPO / "jobs" / "reevaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_every_schedule_writes_the_leaderboard_to_object_storage_or_an_absolute_path():
    # The job runs in /app (root-owned; the image's user is uid 1000) or in an unpacked
    # --working-dir (deleted after the job): a relative --output is unwritable or lost.
    entrypoints = reevaluation_entrypoints()
    assert set(entrypoints) == {"kuberay", "crontab-aws", "crontab-local-example"}
    job = reevaluate_job()
    for where, entrypoint in entrypoints.items():
        assert entrypoint[:2] == ["python", "jobs/reevaluate.py"], where
        assert "--output" in entrypoint, f"{where}: no --output, so the default {'leaderboard'!r}"
        args = job.parse_args(entrypoint[2:])
        for uri in (args.catalog, args.output):
            assert urlparse(uri).scheme == "s3" or os.path.isabs(uri), f"{where}: {uri}"
        if where != "crontab-local-example":  # clusters: object storage by default
            assert urlparse(args.output).scheme == "s3" and urlparse(args.output).netloc, where


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, as the cluster has one (empty registry)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    # Its own process: the server is another machine's process in the cluster.
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


NOBODY = 65534


def as_image_user() -> list[str]:
    """The prefix that runs a command as a non-root user (the image runs as uid 1000): nobody
    when the tests run as root, else the tests' own (non-root) user."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def read_only_app(root: Path) -> Path:
    """What cluster/Dockerfile copies into /app, copied into `root`/app, and read-only: no write
    bit anywhere (for the owner either), owned by root when the tests run as root."""
    app = root / "app"
    for line in dockerfile(CLUSTER / "Dockerfile"):
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            for source in sources:
                target = app / dest / Path(source).name if dest.endswith("/") else app / dest
                target.parent.mkdir(parents=True, exist_ok=True)
                if (REPO / source).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
                    shutil.copytree(REPO / source, target, ignore=ignore)
                else:
                    shutil.copy(REPO / source, target)
    for path in [app, *app.rglob("*")]:
        mode = 0o555 if path.is_dir() else 0o444
        path.chmod(mode)
    return app


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
    }


@pytest.mark.slow
@pytest.mark.parametrize("where", ["kuberay", "crontab-aws"])
def test_the_reevaluation_writes_its_leaderboard_as_the_image_runs_it(
    where, s3_server, mlflow_server
):
    """The schedule's own command line, unchanged, as the Ray job driver runs it in the image:
    a non-root user, in a read-only copy of /app, with the catalog and the leaderboard on S3
    (moto's server at the URIs the configs name) and an empty model registry."""
    import boto3

    entrypoint = reevaluation_entrypoints()[where]
    args = reevaluate_job().parse_args(entrypoint[2:])
    s3 = boto3.client("s3", endpoint_url=s3_server)
    catalog, output = urlparse(args.catalog), urlparse(args.output)
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for bucket in {catalog.netloc, output.netloc} - existing:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(
        Bucket=catalog.netloc, Key=catalog.path.lstrip("/"), Body=b"version: 1\nbenchmarks: []\n"
    )
    prefix = output.path.strip("/")
    for name in ("leaderboard.md", "leaderboard.html"):
        s3.delete_object(Bucket=output.netloc, Key=f"{prefix}/{name}")

    # Not the pytest tmp_path: its parents are private to the tests' user.
    root = Path(tempfile.mkdtemp(prefix="image-", dir="/tmp"))
    try:
        root.chmod(0o755)
        app = read_only_app(root)
        home = root / "home"  # the image user's home (/home/ray) is theirs to write
        home.mkdir()
        if os.geteuid() == 0:
            os.chown(home, NOBODY, NOBODY)
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
            "HOME": str(home),
            # The installed package is the copy's (the image pip-installs /app's platform/).
            "PYTHONPATH": str(app / "platform"),
            "MLFLOW_TRACKING_URI": mlflow_server,
            **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
        }
        user = as_image_user()
        # `python` as PATH finds it, named in full: run by a PATH lookup as another user, this
        # machine's venv interpreter (a link into root's home) can't locate its venv.
        python = str(Path(sys.executable).parent / "python")
        assert entrypoint[0] == "python"
        # The user really can't write the application folder.
        probe = subprocess.run(
            [*user, python, "-c", "import os; open('probe', 'w')"],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
        before = tree_state(app)

        job = subprocess.run(
            [*user, python, *entrypoint[1:]],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-3000:]
        # (MLflow's copy: new on the first run against this server, unchanged on the next.)
        assert f"leaderboard: {args.output} (" in job.stdout, job.stdout
        board = s3.get_object(Bucket=output.netloc, Key=f"{prefix}/leaderboard.md")
        assert board["Body"].read().decode().startswith("# MorphMLP leaderboard")
        s3.head_object(Bucket=output.netloc, Key=f"{prefix}/leaderboard.html")
        assert tree_state(app) == before  # nothing written into /app
    finally:
        for path in [root, *root.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(stat.S_IRWXU)
        shutil.rmtree(root, ignore_errors=True)
