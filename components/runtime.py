"""What runs inside a component's task: settings -> Params, artifacts -> stage folders, stage -> artifacts; and
the tuning pipeline's study worker and trade-off pick.

Needs no kfp import: artifacts are used through `.path`, `.metadata` and `.log_metric` only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _task(name: str) -> Iterator[None]:
    """Stage logs on stdout; a user-fixable error prints one `varstudent: error: <name>: ...` line (what
    `pipeline run --local` and the KFP UI's log show) and exits 1, which fails the task and the run."""
    from varstudent.errors import VarstudentError

    logging.getLogger("varstudent").setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # KFP's executor usually has set up logging already
        logging.basicConfig(stream=sys.stdout, format="varstudent: %(message)s")
    try:
        yield
    except VarstudentError as exc:
        print(f"varstudent: error: {name}: {exc}", flush=True)
        raise SystemExit(1) from None


def run_stage(name: str, settings: str, inputs: dict[str, Any], output: Any, metrics: Any,
              report: Any = None) -> dict[str, Any]:
    """Run stage `name` on the input artifacts' folders, writing into the output artifact's folder."""
    from varstudent.cli import call_stage
    from varstudent.pipeline_params import params_from_settings

    dirs = {upstream: Path(artifact.path) for upstream, artifact in inputs.items()}
    dirs[name] = Path(output.path)
    with _task(name):
        values = call_stage(name, params_from_settings(settings), dirs)
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
        elif isinstance(value, str):  # e.g. stop_reason, dataset: kept as metadata, not a metric
            output.metadata[key] = value
    if report is not None:
        Path(report.path).write_text((dirs[name] / "report.md").read_text())
    return values


def run_tune_worker(settings: str, worker_index: int, workers: int, prepare: Any, teacher: Any, output: Any,
                    metrics: Any) -> int:
    """One worker of the study (`varstudent tune`'s own worker) on the upstream data and teacher, taking its
    share of tune.n_trials (workers on a cluster run at once, kfp.local may run them one after another);
    its trial folders go to the output artifact. Returns how many trials it ran."""
    from varstudent.cli_tune import run_worker
    from varstudent.pipeline_params import params_from_settings

    with _task("tune_worker"):
        params = params_from_settings(settings)
        share = -(-params.tune.n_trials // workers)
        ran = run_worker(params, Path(output.path), Path(prepare.path), Path(teacher.path), worker_index, share)
    metrics.log_metric("trials_run", ran)
    return ran


def run_tune_pick(settings: str, chosen: Any, metrics: Any) -> str:
    """`varstudent tune report` and `tune best` on the study: the Pareto report and best_params.yaml go into the
    `chosen` artifact; returns the chosen settings as the distill task's settings lines."""
    from components import PICKED_SECTIONS
    from varstudent.cli_tune import report_study, write_best
    from varstudent.pipeline_params import params_from_settings, settings_lines

    with _task("tune_pick"):
        params = params_from_settings(settings)
        report_study(params, Path(chosen.path))
        row, best = write_best(params, Path(chosen.path), params.tune.max_accuracy_drop,
                               Path(chosen.path) / "best_params.yaml")
    for key in ("number", "val_accuracy", "compression"):
        metrics.log_metric(f"trial_{key}" if key == "number" else key, row[key])
    return settings_lines(best, PICKED_SECTIONS)
