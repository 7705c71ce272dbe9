"""infra/ offline: the kustomize manifests render and every object is complete and locked down; the
Dockerfiles are pinned, non-root, and carry no secrets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PGUSER|POSTGRES_USER|ROOT_USER", re.I)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: install it (it renders kustomize offline) to check infra/k8s")
    result = subprocess.run([kubectl, "kustomize", str(INFRA / "k8s")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _pod_spec(obj: dict) -> dict:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return template["spec"]


def test_renders_the_expected_objects(rendered: list[dict]) -> None:
    found = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered}
    assert {("Namespace", None, "varstudent"), ("ServiceAccount", "kubeflow", "varstudent-pipeline"),
            ("Deployment", "varstudent", "mlflow"), ("Service", "varstudent", "mlflow"),
            ("StatefulSet", "varstudent", "postgres"), ("StatefulSet", "varstudent", "minio")} <= found
    for obj in rendered:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in ("varstudent", "kubeflow"), obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "varstudent"


def test_services_are_cluster_internal(rendered: list[dict]) -> None:
    services = [o for o in rendered if o["kind"] == "Service"]
    assert services and all(s["spec"]["type"] == "ClusterIP" for s in services)
    mlflow = next(s for s in services if s["metadata"]["name"] == "mlflow")
    assert mlflow["spec"]["ports"][0]["port"] == 5000


def test_every_pod_is_non_root_and_locked_down(rendered: list[dict]) -> None:
    workloads = [o for o in rendered if o["kind"] in WORKLOADS]
    assert len(workloads) == 4
    for obj in workloads:
        spec, where = _pod_spec(obj), f"{obj['kind']}/{obj['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"].get("runAsUser", 0) > 0, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), (where, image)


def test_credentials_come_only_from_secrets(rendered: list[dict]) -> None:
    assert not [o for o in rendered if o["kind"] == "Secret"]  # created by the operator, never committed
    referenced = set()
    for obj in (o for o in rendered if o["kind"] in WORKLOADS):
        for container in _pod_spec(obj)["containers"]:
            for env in container.get("env", []):
                if SENSITIVE.search(env["name"]):
                    assert "value" not in env, (obj["metadata"]["name"], env["name"])
                    referenced.add(env["valueFrom"]["secretKeyRef"]["name"])
                else:  # no password smuggled into a URI either
                    assert not re.search(r"://[^/\s]*:[^/\s]*@", str(env.get("value", ""))), env
    assert referenced == {"mlflow-postgres", "mlflow-s3"}
    text = (INFRA / "README.md").read_text()
    assert all(f"secret generic {name}" in text for name in referenced)  # the guide says how to create them


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


@pytest.mark.parametrize("name, torch_index", [("Dockerfile.cpu", "https://download.pytorch.org/whl/cpu"),
                                               ("Dockerfile.cuda", "https://download.pytorch.org/whl/cu")])
def test_dockerfile_is_pinned_non_root_and_secret_free(name: str, torch_index: str) -> None:
    steps = _instructions(INFRA / name)
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert bases and all(re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", b) for b in bases), bases
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0") and steps.index(("USER", users[-1])) > \
        max(i for i, (op, _) in enumerate(steps) if op == "FROM")  # the final stage runs as that user
    assert not [args for op, args in steps if op == "ADD"]  # COPY only: no remote or auto-extracted sources
    copied = " ".join(args for op, args in steps if op == "COPY")
    assert not re.search(r"\.env|\.pem|\.key|id_rsa|secret|credential", copied, re.I), copied
    assert not [args for op, args in steps if op in ("ENV", "ARG") and SENSITIVE.search(args)]
    run = " ".join(args for op, args in steps if op in ("RUN", "ARG"))
    assert "torch==2.13.0" in run and torch_index in run
    assert "PIP_NO_CACHE_DIR=1" in " ".join(args for op, args in steps if op == "ENV")  # small layers
    assert "rm -rf /var/lib/apt/lists/*" in run
    assert re.search(r"install[^&]* gcc libc6-dev", run)  # the C kernels build at first use on the node


def test_dockerignore_keeps_local_state_and_credentials_out() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "data", "artifacts", "mlruns.db", "*.env", ".git"} <= set(ignored)
