"""MLflow at the edge: lineage of every stage run. Imported only by the CLI and the registry.

- `varstudent run` makes one parent run (`pipeline`) and one nested run per stage; so does a Kubeflow run, whose
  tasks run in separate pods: the first stage to log creates the parent, tagged with the KFP run id, and the
  others find it by that tag (`register`, the last task, closes it). A stage run alone (DVC) makes one run.
  Every run is tagged with the git commit, a digest of the effective params, the KFP run id when the
  environment gives one (`KFP_RUN_ID`), and the prepared dataset's digest; the dataset itself is logged
  as an MLflow dataset input (digest, source, schema).
- The store is checked before any stage works (varstudent.services: bounded retries, one line naming the URI);
  a stage is logged *after* it has written its outputs (run start and end times are the stage's), so a store
  that fails later costs the log, never the outputs. `register` logs its model version into its own run.
- Each logged stage leaves `OUT/<stage>/mlflow_run.json` (run id, and the model version for the teacher), so a
  later stage, even in another process, links to it: the distill run names the teacher's run and version,
  the evaluate plots go to the runs of the stages they describe, and `register` tags the version with all.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from varstudent.config import Params
from varstudent.errors import ServiceError, VarstudentError

# which params sections each stage depends on (logged as that run's params); register logs them all
STAGE_SECTIONS = {"prepare": ("data",), "teacher": ("data", "teacher"),
                  "distill": ("data", "teacher", "student", "distill", "prune"),
                  "prune": ("prune", "export"), "evaluate": ("evaluate",),
                  "register": ("data", "teacher", "student", "distill", "prune", "export", "register")}
RUN_RECORD = "mlflow_run.json"
KFP_RUN_ID_ENV = "KFP_RUN_ID"          # set by the Kubeflow pipeline's tasks
SAFE_KFP_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
GIT_COMMIT_ENV = "VARSTUDENT_GIT_COMMIT"  # for containers without a .git folder
TAG = "varstudent."
# evaluate draws the plots; each goes to the run of the stage whose output it shows
PLOT_RUNS = {"training.png": "distill", "log_alpha.png": "distill", "sparsity.png": "prune",
             "kept_inputs.png": "prune", "report.md": "evaluate", "exports.png": "evaluate",
             "layers.json": "evaluate"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextmanager
def service_errors(uri: str, doing: str) -> Iterator[None]:
    """Any failure talking to MLflow -> one ServiceError naming the URI, password hidden (ours pass through)."""
    from varstudent.services import redact

    try:
        yield
    except VarstudentError:
        raise
    except Exception as exc:  # mlflow, requests, sqlalchemy raise many kinds; the user needs the URI
        raise ServiceError(f"MLflow tracking store {redact(uri)}: {doing} failed: {_first_line(exc)}") from None


def connect(params: Params) -> Any:
    """An MlflowClient for the store (tracking and registry), after checking that a server answers; MLflow's own
    HTTP retries bounded by `services.retries` / `services.timeout_s` (varstudent.services)."""
    from varstudent.services import bound_mlflow_http, check_service

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    bound_mlflow_http(params.services.retries, params.services.timeout_s)
    check_service(params.tracking.uri, "MLflow tracking store", params.services.retries, params.services.timeout_s)
    import mlflow
    from mlflow import MlflowClient

    uri = params.tracking.uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def git_commit() -> str:
    """The commit of the code that runs (VARSTUDENT_GIT_COMMIT wins), `-dirty` when tracked files differ from it;
    "unknown" without git."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]

    def git(*args: str) -> str | None:
        try:  # in the package's folder: the code's commit, wherever the command was started from
            result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                    cwd=Path(__file__).parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def kfp_run_id() -> str | None:
    """The Kubeflow run this process is a task of: set from the pod's `pipeline/runid` label on a cluster
    (pipelines/training.py) and by `varstudent pipeline run --local` for its tasks."""
    return os.environ.get(KFP_RUN_ID_ENV) or None


def searchable_kfp_run_id() -> str | None:
    """The KFP run id when it is safe inside an MLflow search filter (KFP's ids are UUIDs), else None."""
    run_id = kfp_run_id()
    return run_id if run_id and SAFE_KFP_RUN_ID.fullmatch(run_id) else None


def lineage_tags(params: Params, dataset_digest: str | None) -> dict[str, str]:
    """The tags every run and every registered version carries."""
    tags = {f"{TAG}git_commit": git_commit(), f"{TAG}params_digest": params.digest()}
    if tags[f"{TAG}git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags[f"{TAG}git_commit"].removesuffix("-dirty")
    if kfp_run_id():
        tags[f"{TAG}kfp_run_id"] = kfp_run_id()
    if dataset_digest:
        tags[f"{TAG}dataset_digest"] = dataset_digest
    return tags


def flatten(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    flat: dict[str, Any] = {"seed": params.seed}
    full = params.to_dict()
    for section in sections:
        flat.update({f"{section}.{k}": v for k, v in full[section].items()})
    return flat


def read_record(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's run record, or None when that stage was not tracked."""
    from varstudent.artifacts import read_json

    path = stage_dir / RUN_RECORD
    return read_json(path, "MLflow run record") if path.is_file() else None


def _manifest(prepare_dir: Path) -> dict[str, Any] | None:
    from varstudent.artifacts import read_json

    path = prepare_dir / "manifest.json"
    return read_json(path, "prepared-data manifest") if path.is_file() else None


def dataset_input(prepare_dir: Path, manifest: dict[str, Any]) -> Any:
    """The prepared data as an MLflow dataset: digest = sha256 of data.safetensors, its path, its tensors."""
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    shape = tuple(manifest["input_shape"])
    schema = Schema([TensorSpec(np.dtype("uint8"), (-1, *shape), "x_train"), TensorSpec(np.dtype("int64"), (-1,),
                     "y_train"), TensorSpec(np.dtype("uint8"), (-1, *shape), "x_test"),
                     TensorSpec(np.dtype("int64"), (-1,), "y_test")])
    source = LocalArtifactDatasetSource(str((prepare_dir / "data.safetensors").resolve()))
    return MetaDataset(source, name=manifest["dataset"], digest=manifest["sha256"][:16], schema=schema)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """Logs each stage as an MLflow run (nested under one parent inside `pipeline()`); disabled: no-op.

    Connects on first use, so a stage's outputs are written before the tracking store is needed.
    """

    def __init__(self, params: Params) -> None:
        self.params, self.enabled = params, params.tracking.enabled
        self.uri = params.tracking.uri
        self.client: Any = None
        self.parent_id: str | None = None
        self.pipeline_started: int | None = None
        self.seconds = 0.0  # time spent talking to MLflow (the overhead `varstudent run` reports)
        if self.enabled:  # before any stage works: a dead store must not cost an hour of training first
            tic = time.perf_counter()
            self._connect()
            self.seconds += time.perf_counter() - tic

    def _connect(self) -> Any:
        from varstudent.services import redact

        if self.client is None:
            client = connect(self.params)  # an unreachable server: ServiceError "... is unreachable after ..."
            try:
                self.experiment_id = experiment_id(client, self.params.tracking.experiment)
            except Exception as exc:  # mlflow raises many kinds for a bad store; the user needs the URI
                raise ServiceError(f"MLflow tracking store {redact(self.uri)} is not usable: "
                                   f"{_first_line(exc)}") from None
            self.client = client
        return self.client

    def _create_parent(self, start_ms: int, tags: dict[str, str]) -> str:
        parent = self.client.create_run(self.experiment_id, start_time=start_ms, run_name="pipeline",
                                        tags={**tags, f"{TAG}stage": "pipeline"})
        self.client.log_batch(parent.info.run_id, params=_params(flatten(self.params, STAGE_SECTIONS["register"])))
        return parent.info.run_id

    def _kfp_parents(self, kfp_run: str) -> list[str]:
        """The parent run(s) of Kubeflow run `kfp_run`, oldest first."""
        query = f"tags.`{TAG}kfp_run_id` = '{kfp_run}' and tags.`{TAG}stage` = 'pipeline'"
        runs = self.client.search_runs([self.experiment_id], query, max_results=10)
        return [run.info.run_id for run in sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))]

    def _kfp_parent(self, kfp_run: str, start_ms: int, tags: dict[str, str]) -> str:
        """This Kubeflow run's parent run: found by its tag, or created by the first stage that logs. Two tasks
        that create one at once (parallel branches) both keep the oldest and the other is deleted."""
        found = self._kfp_parents(kfp_run)
        if found:
            return found[0]
        mine = self._create_parent(start_ms, tags)
        oldest = self._kfp_parents(kfp_run)[0]
        if oldest != mine:
            self.client.delete_run(mine)
        return oldest

    def _create_run(self, name: str, start_ms: int, tags: dict[str, str]) -> str:
        client = self._connect()
        if self.parent_id is None and self.pipeline_started is not None:
            self.parent_id = self._create_parent(self.pipeline_started, tags)
        elif self.parent_id is None and (kfp_run := searchable_kfp_run_id()):
            self.parent_id = self._kfp_parent(kfp_run, start_ms, tags)
        if self.parent_id:
            tags = {**tags, "mlflow.parentRunId": self.parent_id}
        return client.create_run(self.experiment_id, start_time=start_ms, run_name=name,
                                 tags={**tags, f"{TAG}stage": name}).info.run_id

    @contextmanager
    def pipeline(self) -> Iterator[None]:
        """One parent run around the stages run inside (created with the first stage's run)."""
        self.pipeline_started = _now_ms()
        try:
            yield
        except BaseException:
            if self.parent_id:
                try:  # the stage's error is what the user needs to see
                    self.client.set_terminated(self.parent_id, "FAILED")
                except Exception:  # noqa: BLE001
                    pass
            raise
        if self.parent_id:
            with service_errors(self.uri, "closing the pipeline run"):
                self.client.set_terminated(self.parent_id, "FINISHED")

    @contextmanager
    def stage(self, name: str, dirs: dict[str, Path]) -> Iterator[dict[str, Any]]:
        """Yields a dict; whatever metrics the stage puts in it are logged when it ends."""
        record = dirs[name] / RUN_RECORD
        record.unlink(missing_ok=True)  # a stale record must not link this run's outputs to an old run
        metrics: dict[str, Any] = {}
        if not self.enabled:
            yield metrics
            return
        started = _now_ms()
        manifest = _manifest(dirs["prepare"])
        with self._kfp_run_failed_on_error():
            yield from self._stage(name, dirs, record, metrics, started, manifest)

    @contextmanager
    def _kfp_run_failed_on_error(self) -> Iterator[None]:
        """In a Kubeflow task a failing stage marks its run's parent FAILED (the process ends with the stage)."""
        try:
            yield
        except BaseException:
            kfp_run = searchable_kfp_run_id()
            if self.pipeline_started is None and kfp_run:
                try:  # the stage's error is what the user needs to see
                    for parent in self._kfp_parents(kfp_run)[:1]:
                        self.client.set_terminated(parent, "FAILED")
                except Exception:  # noqa: BLE001
                    pass
            raise

    def _stage(self, name: str, dirs: dict[str, Path], record: Path, metrics: dict[str, Any], started: int,
               manifest: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        if name == "register":  # it logs its model version into its own run: open the run first
            import mlflow

            tic = time.perf_counter()
            with service_errors(self.uri, "starting the register run"):
                tags = lineage_tags(self.params, manifest and manifest["sha256"][:16])
                run_id = self._create_run(name, started, tags)
                mlflow.start_run(run_id=run_id)
            try:
                yield metrics
            except BaseException:
                mlflow.end_run("FAILED")
                raise
            mlflow.end_run()
            self.seconds += time.perf_counter() - tic  # all of register is registration work
        else:
            yield metrics
            manifest = manifest or _manifest(dirs["prepare"])  # prepare has just written it
            run_id = None
        tic = time.perf_counter()
        with service_errors(self.uri, f"logging the {name} run"):
            tags = lineage_tags(self.params, manifest and manifest["sha256"][:16])
            run_id = run_id or self._create_run(name, started, tags)
            extra = self._log_stage(run_id, name, dirs, metrics, manifest)
            self.client.set_terminated(run_id, "FINISHED")
            if name == "register" and self.pipeline_started is None and self.parent_id:  # a Kubeflow run's end
                self.client.set_terminated(self.parent_id, "FINISHED")
        from varstudent.fileio import write_json

        write_json(record, {"run_id": run_id, "experiment_id": self.experiment_id, "tracking_uri": self.uri,
                            "stage": name, **extra})
        self.seconds += time.perf_counter() - tic

    def _log_stage(self, run_id: str, name: str, dirs: dict[str, Path], metrics: dict[str, Any],
                   manifest: dict[str, Any] | None) -> dict[str, Any]:
        from mlflow.entities import InputTag, Metric

        client, extra = self.client, {}
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        now = _now_ms()
        logged = [Metric(k, v, now, 0) for k, v in numeric.items()]
        logged += _history_metrics(dirs[name] / "history.json", now) if name in ("teacher", "distill") else []
        tags = {f"{TAG}{k}": str(v) for k, v in metrics.items() if isinstance(v, str)}
        if name == "distill":  # the student's run names its teacher's run and model version
            teacher = read_record(dirs["teacher"]) or {}
            for key in ("run_id", "model_version", "model_name"):
                if teacher.get(key):
                    tags[f"{TAG}teacher_{key}"] = str(teacher[key])
        from mlflow.entities import RunTag

        for i in range(0, len(logged), 1000):  # mlflow's batch limit
            client.log_batch(run_id, metrics=logged[i:i + 1000],
                             params=_params(flatten(self.params, STAGE_SECTIONS[name])) if i == 0 else [],
                             tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [])
        if manifest is not None:
            from mlflow.entities import DatasetInput

            context = "prepared" if name == "prepare" else "training" if name in ("teacher", "distill") else "eval"
            client.log_inputs(run_id, [DatasetInput(dataset_input(dirs["prepare"], manifest)._to_mlflow_entity(),
                                                    [InputTag("mlflow.data.context", context)])])
        if name == "teacher":
            from varstudent import registry

            extra = registry.record_teacher(client, run_id, self.params, dirs, metrics)
        if name == "evaluate":
            self._log_plots(run_id, dirs)
        return extra

    def _log_plots(self, evaluate_run: str, dirs: dict[str, Path]) -> None:
        for file, stage in PLOT_RUNS.items():
            path = dirs["evaluate"] / file
            if path.is_file():
                record = read_record(dirs[stage]) if stage != "evaluate" else None
                self.client.log_artifact(record["run_id"] if record else evaluate_run, str(path), "plots")


def _params(flat: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in flat.items()]


def _history_metrics(path: Path, now: int) -> list[Any]:
    """Per-epoch values of history.json as metric steps (`epoch/NAME`): the training curves in the UI."""
    from mlflow.entities import Metric

    from varstudent.artifacts import read_json

    if not path.is_file():
        return []
    rows = read_json(path, "training history", list)
    return [Metric(f"epoch/{key}", float(value), now, int(row.get("epoch", i)))
            for i, row in enumerate(rows) for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]
