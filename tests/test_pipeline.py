"""The Kubeflow pipeline: compiled IR (tasks, accelerators, caching, every parameter with its params.yaml
default), a local kfp.local run that reproduces the CLI's numbers, a failing stage's error, submit/schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from components import STAGES
from tests.conftest import REPO, assert_clean_error, cli
from tests.test_cli import _corrupt_header, _idx_folder
from varstudent.config import load_params
from varstudent.pipeline_params import params_from_settings, pipeline_parameters

# a tiny budget: a few seconds of training per stage on digits
TINY = ["data.dataset=digits", "teacher.arch=mlp-64-64", "student.arch=mlp-32-16", "teacher.epochs=3",
        "distill.epochs=4", "distill.kl_warmup_epochs=1", "export.formats=[compact, sparse]",
        "export.choose_repeats=1", "evaluate.latency_repeats=1", "evaluate.latency_warmup=0",
        "tracking.enabled=false"]


def _read_ir(path: Path) -> dict:
    """The pipeline spec with the platform spec (tolerations), which the compiler writes as a second document."""
    spec, *platform = yaml.safe_load_all(path.read_text())
    return spec | (platform[0] if platform else {})


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ir")
    result = cli("pipeline", "compile", "--params", str(REPO / "params.yaml"), "--output", str(out / "p.yaml"),
                 cwd=out)
    assert result.returncode == 0, result.stderr
    return _read_ir(out / "p.yaml")


def test_ir_has_the_stages_in_dependency_order(ir: dict) -> None:
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare", "teacher", "distill", "prune", "evaluate", "register"}  # params.yaml tracks
    deps = {name: sorted(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert deps == {"prepare": [], "teacher": ["prepare"], "distill": ["prepare", "teacher"],
                    "prune": ["distill", "prepare"], "evaluate": ["distill", "prepare", "prune", "teacher"],
                    "register": ["distill", "evaluate", "prepare", "prune", "teacher"]}
    order = [spec.name for spec in STAGES]  # the table the pipeline is built from is a topological order
    assert all(order.index(dep) < order.index(name) for name, ds in deps.items() for dep in ds)
    # artifacts flow between tasks: distill reads the teacher task's Model
    teacher_in = tasks["distill"]["inputs"]["artifacts"]["teacher"]["taskOutputArtifact"]
    assert teacher_in == {"outputArtifactKey": "teacher", "producerTask": "teacher"}
    kinds = {key: comp["outputDefinitions"]["artifacts"]
             for key, comp in ir["components"].items() if key.startswith("comp-")}
    assert kinds["comp-teacher"]["teacher"]["artifactType"]["schemaTitle"] == "system.Model"
    assert kinds["comp-prepare"]["prepare"]["artifactType"]["schemaTitle"] == "system.Dataset"
    assert kinds["comp-evaluate"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert kinds["comp-evaluate"]["report"]["artifactType"]["schemaTitle"] == "system.Markdown"


def test_ir_accelerators_tolerations_caching_retries_on_the_right_tasks(ir: dict) -> None:
    kfp = load_params(REPO / "params.yaml").kfp
    executors = ir["deploymentSpec"]["executors"]
    with_gpu = {name.removeprefix("exec-") for name, ex in executors.items()
                if "accelerator" in ex["container"].get("resources", {})}
    assert with_gpu == {"teacher", "distill"}
    for name in with_gpu:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == kfp.accelerator_type == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == str(kfp.accelerator_count) == "1"
        assert resources["resourceCpuRequest"] == kfp.cpu_request
        assert resources["resourceMemoryRequest"] == kfp.memory_request
    platform = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tolerated = {name.removeprefix("exec-"): spec["tolerations"] for name, spec in platform.items()
                 if "tolerations" in spec}
    assert set(tolerated) == {"teacher", "distill"}
    assert all(t == [{"key": kfp.gpu_taint, "operator": "Exists", "effect": "NoSchedule"}]
               for t in tolerated.values())
    tasks = ir["root"]["dag"]["tasks"]
    assert {n for n, t in tasks.items() if t["cachingOptions"].get("enableCache")} == {"prepare", "teacher"}
    assert {n: t["retryPolicy"]["maxRetryCount"] for n, t in tasks.items() if "retryPolicy" in t} == \
        {"teacher": kfp.retries, "distill": kfp.retries}
    for executor in executors.values():  # the project image everywhere; nothing installed at run time
        assert executor["container"]["image"] == kfp.image
        assert "pip install" not in " ".join(executor["container"]["command"])


def test_ir_gives_every_task_the_kfp_run_id_from_its_pod(ir: dict) -> None:
    from pipelines.training import RUN_ID_FIELD

    platform = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(platform) == {f"exec-{name}" for name in ir["root"]["dag"]["tasks"]}
    for name, spec in platform.items():
        assert spec["fieldPathAsEnv"] == [{"name": "KFP_RUN_ID", "fieldPath": RUN_ID_FIELD}], name
    # a pod field, not a task input: the cache key of prepare and teacher stays the same from run to run
    for name, task in ir["root"]["dag"]["tasks"].items():
        assert "pipeline_job_uuid" not in json.dumps(task), name


def test_ir_has_every_setting_as_a_parameter_with_its_params_yaml_default(ir: dict) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    expected = {"seed": raw["seed"]}
    for section, values in raw.items():
        if isinstance(values, dict) and section not in ("kfp", "tune"):  # how to build; the study
            expected |= {f"{section}_{key}": value for key, value in values.items()}
    declared = ir["root"]["inputDefinitions"]["parameters"]
    assert set(declared) == set(expected)
    for name, value in expected.items():
        default = declared[name]["defaultValue"]
        if isinstance(value, list):  # list settings travel as JSON strings
            assert json.loads(default) == value, name
        else:
            assert default == value and type(default) is type(value) or \
                (isinstance(value, int) and not isinstance(value, bool) and default == float(value)), name


def test_compile_follows_set_overrides_for_defaults_and_image(tmp_path: Path) -> None:
    from pipelines.training import compile_pipeline

    params = load_params(REPO / "params.yaml", ["distill.kd_weight=0.7", "kfp.image=registry.local/vs:1",
                                                "kfp.accelerator_count=0", "tracking.enabled=false"])
    ir = _read_ir(compile_pipeline(params, tmp_path / "p.yaml"))
    assert "register" not in ir["root"]["dag"]["tasks"]  # registering needs MLflow tracking
    assert ir["root"]["inputDefinitions"]["parameters"]["distill_kd_weight"]["defaultValue"] == 0.7
    executors = ir["deploymentSpec"]["executors"].values()
    assert {ex["container"]["image"] for ex in executors} == {"registry.local/vs:1"}
    assert not any("accelerator" in ex["container"].get("resources", {}) for ex in executors)


def test_settings_lines_read_back_with_the_declared_types() -> None:
    params = load_params(REPO / "params.yaml", ["distill.bsr_weight=1.0e-5", "export.formats=[onnx, compact]"])
    lines = {p.key: p.default for p in pipeline_parameters(params)}
    # how a backend may render the values into the settings string: ints as doubles, bools capitalised
    rendered = "\n".join(f"{key}={float(v) if isinstance(v, int) and not isinstance(v, bool) else v}"
                         for key, v in lines.items())
    back = params_from_settings(rendered)
    assert back.to_dict() | {"kfp": None, "tune": None} == params.to_dict() | {"kfp": None, "tune": None}
    assert back.distill.bsr_weight == 1e-5 and back.teacher.epochs == params.teacher.epochs
    from varstudent.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.epochs: expected a number"):
        params_from_settings("distill.epochs=many")
    with pytest.raises(ConfigError, match="unknown line"):
        params_from_settings("distill.kd_wieght=1")


def _metrics_artifact(root: Path) -> dict:
    """The evaluate task's Metrics artifact as kfp.local recorded it (values in executor_output.json)."""
    (run,) = list(root.iterdir())
    output = json.loads((run / "evaluate" / "executor_output.json").read_text())
    return output["artifacts"]["metrics"]["artifacts"][0]["metadata"]


@pytest.mark.slow
def test_local_run_matches_the_cli_numbers(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1"}  # same threads for both: the same floating-point sums
    local = cli("pipeline", "run", "--local", *_sets(TINY), "--root", str(tmp_path / "root"), "--out",
                str(tmp_path / "published"), cwd=tmp_path, env=env)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert "compact student" in local.stdout and "compression:" in local.stdout  # the evaluate summary
    assert "Skipping registering" not in local.stdout + local.stderr  # the executor's import noise, unless --verbose
    direct = cli("run", *_sets(TINY), "--out", str(tmp_path / "direct"), cwd=tmp_path, env=env)
    assert direct.returncode == 0, direct.stderr[-3000:]
    expected = json.loads((tmp_path / "direct/evaluate/metrics.json").read_text())
    artifact = _metrics_artifact(tmp_path / "root")
    for key in ("teacher_accuracy", "student_accuracy", "compact_accuracy", "nonzero_weights",
                "student_nonzero_weights", "teacher_weights", "compact_weights", "compression_vs_teacher"):
        assert artifact[key] == float(expected[key]), key  # Metrics keep numbers as floats
    run = next((tmp_path / "root").iterdir())
    assert (run / "evaluate" / "report").read_text().startswith("#")  # the Markdown report artifact
    assert (run / "prune" / "prune" / "sparse.json").is_file()  # every export travels in the prune Model
    # and the stage folders are published in `varstudent run`'s layout
    published = json.loads((tmp_path / "published/evaluate/metrics.json").read_text())
    assert published["compact_accuracy"] == expected["compact_accuracy"]
    untracked = sorted(s.name for s in STAGES if not s.tracked_only)  # TINY turns tracking (and register) off
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == untracked


@pytest.mark.slow
def test_a_tracked_local_run_is_one_parent_run_tagged_with_its_kfp_run_id(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    tracked = [item for item in TINY if not item.startswith("tracking.")] + [
        f"tracking.uri={uri}", "register.max_accuracy_drop=1", "register.min_compression=1"]
    local = cli("pipeline", "run", "--local", *_sets(tracked), "--root", str(tmp_path / "root"), "--out",
                str(tmp_path / "published"), cwd=tmp_path)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    run_id = local.stdout.split("KFP run id (MLflow tag varstudent.kfp_run_id): ")[1].split()[0]
    assert run_id.startswith("local-")
    client = mlflow.MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("varstudent").experiment_id])
    tagged = [r for r in runs if r.data.tags.get("varstudent.kfp_run_id") == run_id]
    assert len(tagged) == len(runs) == len(STAGES) + 1  # every task in its own process, one tree
    (parent,) = [r for r in tagged if r.data.tags["varstudent.stage"] == "pipeline"]
    assert parent.info.status == "FINISHED"  # closed by register, the last task
    stages = {r.data.tags["varstudent.stage"]: r for r in tagged if r is not parent}
    assert set(stages) == {spec.name for spec in STAGES}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    version = client.get_model_version_by_alias("varstudent-student", "champion")
    assert version.tags["varstudent.kfp_run_id"] == run_id
    assert "KFP_RUN_ID" not in os.environ


def test_a_failing_kfp_task_marks_its_runs_parent_failed(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = {"KFP_RUN_ID": "0b5e4c9a-run"}  # what a cluster's pod gets from its pipeline/runid label
    sets = _sets(["data.dataset=digits", f"tracking.uri={uri}"])
    assert cli("prepare", *sets, cwd=tmp_path, env=env).returncode == 0
    failed = cli("distill", *sets, cwd=tmp_path, env=env)  # another task, another process: no teacher yet
    assert_clean_error(failed, "teacher")
    client = mlflow.MlflowClient(uri, uri)
    runs = client.search_runs([client.get_experiment_by_name("varstudent").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["varstudent.stage"] == "pipeline"]
    assert parent.data.tags["varstudent.kfp_run_id"] == "0b5e4c9a-run" and parent.info.status == "FAILED"
    (prepare,) = [r for r in runs if r.data.tags["varstudent.stage"] == "prepare"]
    assert prepare.data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.slow
def test_a_failing_stage_fails_the_run_with_its_error(tmp_path: Path) -> None:
    folder = _idx_folder(tmp_path)
    message = _corrupt_header(folder)
    result = cli("pipeline", "run", "--local", "--set", f"data.dataset=dir:{folder}", "--set",
                 "tracking.enabled=false", "--root", str(tmp_path / "root"), cwd=tmp_path)
    assert_clean_error(result, "prepare:", message)
    (run,) = list((tmp_path / "root").iterdir())
    assert not (run / "teacher").exists()  # nothing downstream ran


def test_run_without_local_is_a_clear_error(tmp_path: Path) -> None:
    assert_clean_error(cli("pipeline", "run", cwd=tmp_path), "--local")


class FakeClient:
    """Records what the CLI asks of a KFP endpoint."""
    calls: list[tuple[str, dict]] = []

    def __init__(self, host: str) -> None:
        self.calls.append(("init", {"host": host}))

    def create_run_from_pipeline_package(self, path: str, **kwargs):
        self.calls.append(("run", {"path": path, **kwargs}))
        return type("Run", (), {"run_id": "r-1"})()

    def create_experiment(self, name: str):
        self.calls.append(("experiment", {"name": name}))
        return type("Experiment", (), {"experiment_id": "e-1"})()

    def create_recurring_run(self, **kwargs):
        self.calls.append(("recurring", kwargs))
        return type("Job", (), {"recurring_run_id": "j-1"})()


def _invoke(args: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import kfp
    from typer.testing import CliRunner

    from varstudent.cli import app

    FakeClient.calls = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, [*args, "--params", str(REPO / "params.yaml"), "--out", str(tmp_path)])


def test_submit_sends_the_compiled_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = _invoke(["pipeline", "submit", "--host", "http://kfp:8080", "--run-name", "nightly",
                      "--experiment", "exp"], monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    (_, init), (_, run) = FakeClient.calls
    assert init == {"host": "http://kfp:8080"}
    assert run["run_name"] == "nightly" and run["experiment_name"] == "exp"
    assert run["service_account"] == "varstudent-pipeline"
    assert "root" in _read_ir(Path(run["path"]))  # a compiled IR


def test_schedule_is_one_at_a_time_without_catch_up(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = _invoke(["pipeline", "schedule", "--host", "http://kfp:8080", "--cron", "0 0 3 * * 1"],
                     monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    recurring = dict(FakeClient.calls)["recurring"]
    assert recurring["cron_expression"] == "0 0 3 * * 1" and recurring["experiment_id"] == "e-1"
    assert recurring["max_concurrency"] == 1 and recurring["no_catchup"] is True
    assert Path(recurring["pipeline_package_path"]).is_file()


def test_schedule_rejects_a_five_field_cron(tmp_path: Path) -> None:
    assert_clean_error(cli("pipeline", "schedule", "--host", "http://kfp:8080", "--cron", "0 3 * * 1",
                           cwd=tmp_path), "6 fields")
