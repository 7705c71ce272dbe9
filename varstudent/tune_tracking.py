"""MLflow at the edge for studies: one run per study, one nested run per trial, the report as artifacts.

Our own small callback (optuna-integration's MLflowCallback is deprecated). It talks to the tracking store
through MlflowClient, so many worker processes can log into the same parent run without sharing an
active-run stack. Trials are duck-typed optuna FrozenTrials: this module does not import optuna.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from varstudent.config import Params
from varstudent.errors import ServiceError

log = logging.getLogger("varstudent")


class StudyTracker:
    """Logs a study and its trials into the MLflow experiment of `tracking`."""

    def __init__(self, params: Params) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        cfg = params.tracking
        try:
            self.client = MlflowClient(tracking_uri=cfg.uri)
            found = self.client.get_experiment_by_name(cfg.experiment)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(cfg.experiment)
                except Exception:  # another worker created it first
                    self.experiment_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
            else:
                self.experiment_id = found.experiment_id
        except Exception as exc:  # mlflow raises many kinds for a bad store; the user needs the URI
            raise ServiceError(f"MLflow tracking store {cfg.uri} is not usable: "
                               f"{str(exc).strip().splitlines()[0][:200]}") from None

    def start_study_run(self, study_name: str, settings: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"tune {study_name}",
                                     tags={"varstudent.stage": "tune", "optuna.study": study_name})
        self.client.log_batch(run.info.run_id, params=_params(settings))
        return run.info.run_id

    def log_trial(self, parent_run_id: str, study_name: str, trial: Any, reason: str | None = None) -> None:
        """One nested run: the trial's params, both objectives (when complete), its state and reason."""
        from mlflow.entities import Metric

        state = trial.state.name
        tags = {"mlflow.parentRunId": parent_run_id, "optuna.study": study_name,
                "optuna.trial_number": str(trial.number), "optuna.state": state,
                "varstudent.stage": "tune_trial"}
        reason = reason or trial.user_attrs.get("fail_reason")
        if reason:
            tags["optuna.fail_reason"] = reason[:5000]
        if trial.user_attrs.get("worker"):
            tags["optuna.worker"] = trial.user_attrs["worker"]
        run = self.client.create_run(self.experiment_id, run_name=f"trial {trial.number}", tags=tags)
        metrics = []
        if state == "COMPLETE":
            names = ("val_accuracy", "compression")
            metrics = [Metric(name, float(v), 0, 0) for name, v in zip(names, trial.values, strict=True)]
            metrics += [Metric(k, float(trial.user_attrs[k]), 0, 0) for k in ("nonzero_weights", "seconds")
                        if isinstance(trial.user_attrs.get(k), (int, float))]
        self.client.log_batch(run.info.run_id, metrics=metrics, params=_params(trial.params))
        self.client.set_terminated(run.info.run_id, status="FINISHED" if state == "COMPLETE" else "FAILED")

    def log_report(self, parent_run_id: str, files: list[Path], summary: dict[str, float]) -> None:
        from mlflow.entities import Metric

        for path in files:
            self.client.log_artifact(parent_run_id, str(path), artifact_path="report")
        self.client.log_batch(parent_run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in summary.items()])

    def finish(self, parent_run_id: str) -> None:
        self.client.set_terminated(parent_run_id, status="FINISHED")


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def log_trial_safely(tracker: StudyTracker, parent_run_id: str, study_name: str, trial: Any,
                     reason: str | None = None) -> None:
    """Log a finished trial; a tracking failure is reported and does not stop the study (the trial itself
    is safe in the Optuna storage)."""
    try:
        tracker.log_trial(parent_run_id, study_name, trial, reason)
    except Exception as exc:
        log.warning("MLflow: trial %d not logged: %s", trial.number, str(exc).splitlines()[0][:200])
