"""MLflow at the edge: one plain run per stage (params + numeric metrics). Imported only by the CLI.

Lineage, the model registry and nested runs come with the MLflow issue; this keeps the embedded default
(a local sqlite store) working with no server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from varstudent.config import Params
from varstudent.errors import ServiceError

# which params sections each stage depends on (logged as that run's params)
STAGE_SECTIONS = {"prepare": ("data",), "teacher": ("data", "teacher"),
                  "distill": ("data", "teacher", "student", "distill", "prune"),
                  "prune": ("prune", "export"), "evaluate": ("evaluate",)}


def _flatten(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    flat: dict[str, Any] = {"seed": params.seed}
    full = params.to_dict()
    for section in sections:
        flat.update({f"{section}.{k}": v for k, v in full[section].items()})
    return flat


class Tracker:
    """Logs each stage as an MLflow run; a disabled tracker does nothing."""

    def __init__(self, params: Params) -> None:
        self.params, self.enabled = params, params.tracking.enabled
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from varstudent.services import bound_mlflow_http, check_service, redact

        bound_mlflow_http(params.services.retries, params.services.timeout_s)
        check_service(params.tracking.uri, "MLflow tracking store", params.services.retries,
                      params.services.timeout_s)
        import mlflow

        self.mlflow = mlflow
        try:
            mlflow.set_tracking_uri(params.tracking.uri)
            mlflow.set_experiment(params.tracking.experiment)
        except Exception as exc:  # mlflow raises many kinds for a bad store; the user needs the URI
            raise ServiceError(f"MLflow tracking store {redact(params.tracking.uri)} is not usable: "
                               f"{str(exc).splitlines()[0][:200]}") from None

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Yields a dict; whatever metrics the stage puts in it are logged when it ends."""
        metrics: dict[str, Any] = {}
        if not self.enabled:
            yield metrics
            return
        with self._service(f"could not start the {name} run"):
            self.mlflow.start_run(run_name=name)
            self.mlflow.set_tags({"varstudent.stage": name, "varstudent.params_digest": self.params.digest()})
            self.mlflow.log_params(_flatten(self.params, STAGE_SECTIONS[name]))
        try:
            yield metrics
        except BaseException:
            try:  # the stage's own error is the one to report; a dead server must not hide it
                self.mlflow.end_run("FAILED")
            except Exception:
                pass
            raise
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with self._service(f"could not log the {name} metrics (the stage's outputs are complete)"):
            self.mlflow.log_metrics(numeric)
            self.mlflow.end_run()

    @contextmanager
    def _service(self, what: str) -> Iterator[None]:
        """A server that dies mid-run is one clear line, not a traceback from inside MLflow."""
        from varstudent.services import redact

        try:
            yield
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ServiceError(f"MLflow tracking store {redact(self.params.tracking.uri)}: {what}: "
                               f"{(text[0] if text else type(exc).__name__)[:200]}") from None
