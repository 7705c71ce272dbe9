"""MLflow lineage, the registry gate, pyfunc serving and a real tracking server, after tiny runs on digits."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import REPO, assert_clean_error, cli
from tests.pg import free_port

TINY = ["--set", "data.dataset=digits", "--set", "teacher.arch=mlp-300-300", "--set", "student.arch=mlp-100-50",
        "--set", "teacher.epochs=15", "--set", "distill.epochs=30", "--set", "evaluate.latency_repeats=3",
        "--set", "runtime.progress=false", "--set", "register.max_accuracy_drop=0.2",
        "--set", "register.min_compression=2"]
STAGES = ("prepare", "teacher", "distill", "prune", "evaluate", "register")
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the committed settings the runs below start from


def _client(uri: str) -> Any:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(uri, uri)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `varstudent run` on digits into a fresh sqlite store (in this process: no second interpreter)."""
    from varstudent.cli import app

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root}/mlruns.db"
    app(["run", "--params", str(PARAMS), *TINY, "--set", f"tracking.uri={uri}", "--out", str(root / "artifacts")],
        standalone_mode=False)
    return {"root": root, "uri": uri, "out": root / "artifacts"}


def _params(uri: str, *overrides: str) -> Any:
    from varstudent.config import load_params

    return load_params(PARAMS, [o for o in TINY[1::2]] + [f"tracking.uri={uri}", *overrides])


def _dirs(out: Path) -> dict[str, Path]:
    return {name: out / name for name in STAGES}


def _compact_predictions(out: Path, x: torch.Tensor) -> torch.Tensor:
    from varstudent.artifacts import load_model
    from varstudent.train import predict_logits

    return predict_logits(load_model(out / "prune", "compact"), x).softmax(1)


@pytest.mark.slow
def test_pipeline_run_has_nested_stage_runs_with_lineage(tracked: dict[str, Any]) -> None:
    from varstudent.tracking import GIT_COMMIT_ENV, git_commit

    client, out = _client(tracked["uri"]), tracked["out"]
    experiment = client.get_experiment_by_name("varstudent")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {r.data.tags["varstudent.stage"]: r for r in runs}
    assert sorted(by_stage) == sorted([*STAGES, "pipeline"]) and len(runs) == 7
    parent = by_stage.pop("pipeline")
    manifest = json.loads((out / "prepare/manifest.json").read_text())
    # the commit, or "unknown" without git; "-dirty" is left out of the comparison: it may flip when a tracked
    # file is edited while the tests run
    commit = git_commit().removesuffix("-dirty")
    for stage, run in by_stage.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert run.data.tags["varstudent.params_digest"] == _params(tracked["uri"]).digest()
        tagged = run.data.tags["varstudent.git_commit"]
        assert tagged.removesuffix("-dirty") == commit, stage
        if not os.environ.get(GIT_COMMIT_ENV):
            assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", tagged), tagged
        if commit != "unknown":
            assert run.data.tags["mlflow.source.git.commit"] == commit, stage
        assert run.data.tags["varstudent.dataset_digest"] == manifest["sha256"][:16]
        dataset = run.inputs.dataset_inputs[0].dataset
        assert dataset.digest == manifest["sha256"][:16] and dataset.name == "digits", stage
        assert "data.safetensors" in dataset.source and "x_train" in dataset.schema
        assert json.loads((out / stage / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
    # the student's run links to the teacher's run and model version
    teacher_version = client.get_model_version_by_alias("varstudent-teacher", "champion")
    assert teacher_version.run_id == by_stage["teacher"].info.run_id
    assert by_stage["distill"].data.tags["varstudent.teacher_run_id"] == by_stage["teacher"].info.run_id
    assert by_stage["distill"].data.tags["varstudent.teacher_model_version"] == str(teacher_version.version)
    # training curves as metric steps, plots in the runs of the stages they show
    history = client.get_metric_history(by_stage["distill"].info.run_id, "epoch/test_accuracy")
    assert len(history) == 30 and sorted(m.step for m in history) == list(range(1, 31))
    artifacts = {stage: {a.path for a in client.list_artifacts(by_stage[stage].info.run_id, "plots")}
                 for stage in ("distill", "prune", "evaluate")}
    assert artifacts["distill"] == {"plots/training.png", "plots/log_alpha.png"}
    assert artifacts["prune"] == {"plots/sparsity.png", "plots/kept_inputs.png"}
    assert {"plots/report.md", "plots/exports.png"} <= artifacts["evaluate"]


@pytest.mark.slow
def test_registered_student_loads_as_pyfunc_with_signature_and_tags(tracked: dict[str, Any]) -> None:
    import mlflow

    from varstudent.data import load_prepared

    client, out = _client(tracked["uri"]), tracked["out"]
    version = client.get_model_version_by_alias("varstudent-student", "champion")
    records = {s: json.loads((out / s / "mlflow_run.json").read_text())["run_id"] for s in STAGES}
    tags = version.tags
    metrics = json.loads((out / "evaluate/metrics.json").read_text())
    assert float(tags["varstudent.accuracy"]) == pytest.approx(metrics["compact_accuracy"], abs=1e-6)
    assert float(tags["varstudent.compression"]) == pytest.approx(metrics["compression_vs_teacher"], rel=1e-4)
    assert int(tags["varstudent.bytes"]) == metrics["compact_bytes"]
    assert tags["varstudent.teacher_version"] == str(client.get_model_version_by_alias("varstudent-teacher",
                                                                                   "champion").version)
    assert {s: tags[f"varstudent.run.{s}"] for s in STAGES} == records
    assert tags["varstudent.gate"] == "passed"
    model = mlflow.pyfunc.load_model("models:/varstudent-student@champion")
    assert model.metadata.signature is not None and model.metadata.signature.inputs.inputs[0].shape == (-1, 1, 8, 8)
    assert model.metadata.saved_input_example_info is not None
    data = load_prepared(out / "prepare")
    answer = model.predict(data.x_test.numpy())
    expected = _compact_predictions(out, data.x_test)
    assert answer["class"].tolist() == expected.argmax(1).tolist()
    assert torch.allclose(torch.from_numpy(np.stack(answer["probabilities"])), expected.double(), atol=1e-6)
    files = [a.path for a in mlflow.artifacts.list_artifacts(f"models:/varstudent-student/{version.version}")]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/varstudent-student/{version.version}"))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")], files
    assert sorted(p.name for p in (local / "artifacts").rglob("compact.*")) == ["compact.json",
                                                                             "compact.safetensors"]
    assert "torch==" in (local / "requirements.txt").read_text()


@pytest.mark.slow
def test_lineage_prints_where_the_champion_came_from(tracked: dict[str, Any]) -> None:
    result = cli("lineage", "varstudent-student@champion", "--set", f"tracking.uri={tracked['uri']}",
                 cwd=tracked["root"])
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tracked["out"] / "prepare/manifest.json").read_text())
    assert f"dataset_digest  {manifest['sha256'][:16]}" in result.stdout
    assert "git_commit" in result.stdout and "teacher_version 1" in result.stdout
    assert "distill.kd_weight = 0.5" in result.stdout  # the params
    for stage in STAGES:
        run_id = json.loads((tracked["out"] / stage / "mlflow_run.json").read_text())["run_id"]
        assert f"{stage:<10}{run_id}  FINISHED" in result.stdout
    missing = cli("lineage", "varstudent-student@nope", "--set", f"tracking.uri={tracked['uri']}",
                  cwd=tracked["root"])
    assert_clean_error(missing, "models:/varstudent-student@nope: the registered model varstudent-student has no "
                                "alias 'nope' (its aliases: champion)")
    unknown = cli("lineage", "nosuchmodel@champion", "--set", f"tracking.uri={tracked['uri']}", cwd=tracked["root"])
    assert_clean_error(unknown, "no registered model models:/nosuchmodel@champion")


def _worse_copy(out: Path, dest: Path) -> Path:
    """The same artifacts with noise on the compact student's nonzero weights: as compressed, less accurate."""
    from varstudent.artifacts import load_model, save_model

    shutil.copytree(out, dest)
    net = load_model(dest / "prune", "compact")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if name.endswith("weight") and value.dim() > 1:
                value += (value != 0) * torch.randn(value.shape, generator=gen) * 0.5 * value.abs().mean()
    save_model(net, dest / "prune", "compact")
    return dest


@pytest.mark.slow
def test_gate_promotes_a_better_student_and_keeps_a_worse_one_as_challenger(tracked: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    from varstudent.registry import register_student

    uri = f"sqlite:///{tmp_path}/gate.db"
    client, params = _client(uri), _params(uri)
    good, worse = tracked["out"], _worse_copy(tracked["out"], tmp_path / "worse")
    first = register_student(params, _dirs(worse), tmp_path / "r1")
    assert first["alias"] == "champion" and first["previous_champion"] is None, first  # no champion yet
    better = register_student(params, _dirs(good), tmp_path / "r2")
    assert better["alias"] == "champion" and better["previous_champion"] == first["version"], better
    assert better["accuracy"] > first["accuracy"] + params.register.tolerance
    again = register_student(params, _dirs(worse), tmp_path / "r3")
    assert again["alias"] == "challenger" and again["failed_rule"].startswith("champion_rule balanced")
    version = client.get_model_version("varstudent-student", again["version"])
    assert version.tags["varstudent.gate"] == again["failed_rule"] and "challenger" in version.aliases
    assert str(client.get_model_version_by_alias("varstudent-student", "champion").version) == better["version"]
    strict = register_student(_params(uri, "register.max_accuracy_drop=0.0"), _dirs(good), tmp_path / "r4")
    assert strict["alias"] == "challenger" and strict["failed_rule"].startswith("max_accuracy_drop")
    assert json.loads((tmp_path / "r4/decision.json").read_text())["alias"] == "challenger"
    assert str(client.get_model_version_by_alias("varstudent-student", "champion").version) == better["version"]


@pytest.mark.slow
def test_two_concurrent_registrations_leave_champion_on_the_better(tracked: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent import registry

    uri = f"sqlite:///{tmp_path}/race.db"
    client, params = _client(uri), _params(uri)
    worse = _worse_copy(tracked["out"], tmp_path / "worse")
    scores = registry._champion_scores

    def slow_scores(*args: Any) -> Any:  # widen the window between reading and moving the champion
        found = scores(*args)
        time.sleep(1.5 if threading.current_thread().name == "worse" else 0.3)
        return found

    monkeypatch.setattr(registry, "_champion_scores", slow_scores)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def register(name: str, out: Path) -> None:
        try:
            results[name] = registry.register_student(params, _dirs(out), tmp_path / name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # without the lock both would read "no champion" and the worse one, writing last, would win
    threads = [threading.Thread(target=register, args=("worse", worse), name="worse"),
               threading.Thread(target=register, args=("better", tracked["out"]), name="better")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    champion = client.get_model_version_by_alias("varstudent-student", "champion")
    assert str(champion.version) == results["better"]["version"]
    assert results["better"]["accuracy"] > results["worse"]["accuracy"]
    assert [m.name for m in client.search_registered_models()] == ["varstudent-student"]  # lock released


@pytest.mark.slow
def test_registry_lock_waits_for_the_holder_and_breaks_an_abandoned_one(tmp_path: Path) -> None:
    from varstudent.errors import ServiceError
    from varstudent.registry import registry_lock

    client = _client(f"sqlite:///{tmp_path}/lock.db")
    with registry_lock(client, "m", lease_s=60):
        started = time.monotonic()
        with pytest.raises(ServiceError, match="m.register-lock"):
            with registry_lock(client, "m", lease_s=60, wait_s=0.5):
                pass
        assert time.monotonic() - started >= 0.5  # it waited out wait_s before giving up
    # a holder that releases within wait_s: the waiter gets the lock then, not an error
    held, errors = threading.Event(), []

    def holder() -> None:
        try:
            with registry_lock(client, "m", lease_s=60):
                held.set()
                time.sleep(0.3)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            held.set()

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(10)
    started = time.monotonic()
    with registry_lock(client, "m", lease_s=60, wait_s=5):
        waited = time.monotonic() - started
    thread.join(5)
    assert not errors, errors
    assert 0.1 <= waited < 5  # it waited for the holder's release (~0.3 s)
    assert client.search_registered_models() == []
    client.create_registered_model("m.register-lock")  # left behind by a killed process
    time.sleep(1.1)
    started = time.monotonic()
    with registry_lock(client, "m", lease_s=1):
        assert time.monotonic() - started < 5
    assert client.search_registered_models() == []


def test_registry_lock_retries_when_the_holder_releases_during_a_refused_create(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from varstudent.registry import registry_lock

    client = _client(f"sqlite:///{tmp_path}/lock.db")
    real_create, calls = client.create_registered_model, []

    def racing_create(name: str, **kwargs: Any) -> Any:
        calls.append(name)
        if len(calls) == 1:  # what MLflow raises when the holder deletes the lock between insert and its re-read
            raise MlflowException(f"Registered Model with name={name} not found",
                                  error_code=RESOURCE_DOES_NOT_EXIST)
        return real_create(name, **kwargs)

    client.create_registered_model = racing_create
    with registry_lock(client, "m", lease_s=60):
        assert [m.name for m in client.search_registered_models()] == ["m.register-lock"]
    assert calls == ["m.register-lock", "m.register-lock"]
    assert client.search_registered_models() == []


@pytest.mark.slow
def test_teacher_stage_reuses_the_registered_teacher(tracked: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    shutil.copytree(tracked["out"] / "prepare", out / "prepare")
    result = cli("teacher", *TINY, "--set", f"tracking.uri={tracked['uri']}", "--set",
                 "teacher.source=models:/varstudent-teacher@champion", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not retrained" in result.stderr
    original = tracked["out"] / "teacher"
    assert (out / "teacher/teacher.safetensors").read_bytes() == (original / "teacher.safetensors").read_bytes()
    metrics = json.loads((out / "teacher/metrics.json").read_text())
    assert metrics["teacher_model_version"] == "1" and metrics["epochs_run"] == 0
    assert metrics["teacher_accuracy"] == json.loads((original / "metrics.json").read_text())["teacher_accuracy"]
    assert json.loads((out / "teacher/mlflow_run.json").read_text())["model_version"] == "1"
    client = _client(tracked["uri"])
    assert len(client.search_model_versions("name='varstudent-teacher'")) == 1  # not registered again


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout} s")


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    # the venv's bin first: `mlflow models serve` runs `uvicorn` from PATH
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen(args, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path, **env}, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it forks workers), then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


@pytest.mark.slow
def test_served_champion_answers_invocations_over_http(tracked: dict[str, Any]) -> None:
    from varstudent.data import load_prepared

    port = free_port()
    proc = _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/varstudent-student@champion",
                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                  {"MLFLOW_TRACKING_URI": tracked["uri"], "PYTHONPATH": str(REPO)}, tracked["root"])
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", proc, 120)
        x = load_prepared(tracked["out"] / "prepare").x_test[:16]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": x.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            rows = json.loads(response.read())["predictions"]
    finally:
        _stop(proc)
    expected = _compact_predictions(tracked["out"], x)
    assert [row["class"] for row in rows] == expected.argmax(1).tolist()
    probabilities = torch.tensor([row["probabilities"] for row in rows], dtype=torch.float64)
    assert torch.allclose(probabilities, expected.double(), atol=1e-6)
    assert [round(row["probability"], 6) for row in rows] == [round(p, 6) for p in expected.max(1).values.tolist()]


@pytest.mark.slow
def test_pipeline_against_a_tracking_server_backed_by_postgres(postgres_url: str, tmp_path: Path) -> None:
    import mlflow

    port = free_port()
    server = _start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres_url,
                     "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"],
                    {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", server, 120)
        # fewer epochs than TINY and an open gate: this test is about the server, not the model
        result = cli("run", *TINY, "--set", "teacher.epochs=3", "--set", "distill.epochs=4", "--set",
                     "register.max_accuracy_drop=1", "--set", "register.min_compression=1", "--set",
                     f"tracking.uri={uri}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        client = _client(uri)
        runs = client.search_runs([client.get_experiment_by_name("varstudent").experiment_id])
        assert sorted(r.data.tags["varstudent.stage"] for r in runs) == sorted([*STAGES, "pipeline"])
        champion = client.get_model_version_by_alias("varstudent-student", "champion")
        assert champion.tags["varstudent.run.register"] in {r.info.run_id for r in runs}
        model = mlflow.pyfunc.load_model("models:/varstudent-student@champion")  # artifacts through the server
        from varstudent.data import load_prepared

        x = load_prepared(tmp_path / "artifacts/prepare").x_test
        assert model.predict(x.numpy())["class"].tolist() == \
            _compact_predictions(tmp_path / "artifacts", x).argmax(1).tolist()
        lineage = cli("lineage", "varstudent-student@champion", "--set", f"tracking.uri={uri}", cwd=tmp_path)
        assert lineage.returncode == 0 and "register" in lineage.stdout, lineage.stderr[-2000:]
    finally:
        _stop(server)
