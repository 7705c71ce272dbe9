"""`varstudent tune`: run (or join) an Optuna study; `tune best` writes the chosen trial's params file;
`tune report` redraws the Pareto front from the storage.

    varstudent tune --workers 2                                  # local sqlite study, two processes
    varstudent tune --storage postgresql://u@db/optuna           # on each machine: they share the study
    varstudent tune best --max-accuracy-drop 0.5 --to best.yaml  # then: varstudent run --params best.yaml
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

tune_app = typer.Typer(add_completion=False, help="Multi-objective Optuna study of the distill settings: "
                       "validation accuracy and compression.")

log = logging.getLogger("varstudent")

ParamsOpt = typer.Option(None, "--params", help="params file; the study reads its `tune` section "
                         "[default: ./params.yaml if there is one, else the built-in defaults]")
SetOpt = typer.Option(None, "--set", help="override one setting, e.g. --set tune.n_trials=40 (repeatable)")
OutOpt = typer.Option(Path("artifacts"), "--out", help="artifacts root; the study uses OUT/prepare and OUT/tune/")
StorageOpt = typer.Option(None, "--storage", help="Optuna storage (overrides tune.storage): postgresql://..., "
                          "sqlite:///FILE, or a journal file path")
StudyOpt = typer.Option(None, "--study", help="study name (overrides tune.study_name)")


def _settings(params_file: Path, overrides: list[str] | None, storage: str | None, study: str | None):
    from varstudent.cli import _load

    params = _load(params_file, overrides)
    changes = {k: v for k, v in (("storage", storage), ("study_name", study)) if v}
    return dataclasses.replace(params, tune=dataclasses.replace(params.tune, **changes)) if changes else params


class _Session:
    """The study, its storage and (when tracking is on) its MLflow run, opened the same way by every command."""

    def __init__(self, params, out: Path, worker_index: int = 0, must_exist: bool = False) -> None:
        from varstudent import tune

        self.params, self.out = params, out
        self.tracker, self.parent_run_id = None, None
        self.url = tune.storage_url(params, out)
        from varstudent.services import sqlite_file

        database = sqlite_file(self.url)
        if must_exist and database is not None and not database.is_file():
            # opening it would create an empty database where the study was expected
            from varstudent.errors import ConfigError

            raise ConfigError(f"no study storage at {database}: run `varstudent tune` with this --out first, or "
                              "pass --storage")
        storage = tune.open_storage(params, self.url, self.log_stale_trial)
        self.study = tune.open_study(params, storage, worker_index, must_exist)
        if params.tracking.enabled:
            from varstudent.tune_tracking import StudyTracker

            self.tracker = StudyTracker(params)
            self.parent_run_id = self.study.user_attrs.get(tune.MLFLOW_RUN_ATTR)
            if self.parent_run_id is None:
                settings = {f"tune.{k}": v for k, v in params.to_dict()["tune"].items()}
                settings["tune.storage"] = tune.redact(self.url)
                self.parent_run_id = self.tracker.start_study_run(params.tune.study_name, settings)
                self.study.set_user_attr(tune.MLFLOW_RUN_ATTR, self.parent_run_id)

    def log_trial(self, _study: Any, trial: Any, reason: str | None = None) -> None:
        """Optuna callback: every finished trial becomes a nested MLflow run."""
        if self.tracker is not None:
            from varstudent.tune_tracking import log_trial_safely

            log_trial_safely(self.tracker, self.parent_run_id, self.params.tune.study_name, trial, reason)

    def log_stale_trial(self, study: Any, trial: Any) -> None:
        """Heartbeat callback: a RUNNING trial whose worker went silent was failed by this process."""
        from varstudent.tune import STALE_REASON

        log.warning("trial %d failed: %s", trial.number, STALE_REASON)
        self.log_trial(study, trial, STALE_REASON)

    def report(self) -> dict[str, Any]:
        from varstudent import tune
        from varstudent.tune_report import front_table, write_report

        rows, front = tune.trial_rows(self.study), tune.pareto_numbers(self.study)
        title = f"study {self.params.tune.study_name}: {len(rows)} trials, {len(front)} on the Pareto front"
        files = write_report(rows, front, tune.tune_dirs(self.out, self.params.tune.study_name)["report"], title)
        if self.tracker is not None:
            done = [r for r in rows if r["state"] == "COMPLETE"]
            summary = {"trials": len(rows), "complete": len(done), "pareto_size": len(front),
                       "failed": sum(r["state"] == "FAIL" for r in rows)}
            if done:
                summary.update(best_val_accuracy=max(r["val_accuracy"] for r in done),
                               best_compression=max(r["compression"] for r in done))
            self.tracker.log_report(self.parent_run_id, files, summary)
            if tune.budget_left(self.study, self.params.tune.n_trials) <= 0:
                self.tracker.finish(self.parent_run_id)
        typer.echo(title)
        typer.echo(front_table(rows, front) if front else "(no completed trial)")
        typer.echo(f"report: {files[0].parent}")
        return {"rows": rows, "front": front}


def _work_here(session: _Session, teacher_dir: Path, max_trials: int | None = None) -> int:
    """This process takes trials of the session's study; returns how many it ran."""
    from varstudent import tune as tuning

    logging.getLogger("varstudent.train").setLevel(logging.WARNING)
    callbacks = [session.log_trial] if session.tracker else []
    ran = tuning.work(session.study, session.params, session.out, teacher_dir, callbacks, max_trials)
    log.info("worker %s ran %d trials", tuning.worker_name(), ran)
    return ran


def run_worker(settings, out: Path, prepared: Path, teacher: Path, worker_index: int, max_trials: int) -> int:
    """One worker of a study on given prepared data and teacher (a tune_worker task of the tuning pipeline):
    the same worker as `varstudent tune --teacher DIR --worker-index I`, taking at most `max_trials`."""
    from varstudent import tune as tuning

    session = _Session(settings, out, worker_index)
    return _work_here(session, tuning.prepare_study_inputs(settings, out, teacher, prepared), max_trials)


def write_best(settings, out: Path, max_accuracy_drop: float, to: Path) -> tuple[dict[str, Any], Any]:
    """Pick the trade-off trial of the study and write its settings to `to` as a params file; returns the
    trial's row and its Params (`tune best`, and the tune_pick task of the tuning pipeline)."""
    from varstudent import tune
    from varstudent.fileio import atomic_write_bytes

    session = _Session(dataclasses.replace(settings, tracking=dataclasses.replace(settings.tracking,
                                                                                   enabled=False)), out,
                       must_exist=True)
    rows = tune.trial_rows(session.study)
    chosen = tune.choose_tradeoff(rows, tune.pareto_numbers(session.study), max_accuracy_drop)
    best = tune.params_for_trial(settings, chosen)
    header = (f"# written by `varstudent tune best` from study {settings.tune.study_name!r}, trial "
              f"{chosen['number']}: validation accuracy {100 * chosen['val_accuracy']:.2f}%, compression "
              f"{chosen['compression']:.1f}x (max accuracy drop {max_accuracy_drop} points)\n")
    to.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(to, (header + best.to_yaml()).encode())
    typer.echo(f"trial {chosen['number']}: validation accuracy {100 * chosen['val_accuracy']:.2f}%, "
               f"compression {chosen['compression']:.1f}x -> {to}")
    return chosen, best


def _spawn_workers(n: int, first_index: int, params_file: Path | None, overrides: list[str], out: Path, url: str,
                   study_name: str, teacher_dir: Path) -> list[subprocess.Popen]:
    """N child `varstudent tune` processes on this machine, the CPU cores split between them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    procs = []
    for index in range(first_index, first_index + n):
        cmd = [sys.executable, "-m", "varstudent.cli", "tune", *(["--params", str(params_file)] if params_file else []),
               "--out", str(out), "--storage", url, "--study", study_name, "--teacher", str(teacher_dir),
               "--worker-index", str(index), "--no-report"]
        for text in overrides:
            cmd += ["--set", text]
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


@tune_app.callback(invoke_without_command=True)
def tune(ctx: typer.Context, params: Path = ParamsOpt, set_: list[str] | None = SetOpt, out: Path = OutOpt,
         storage: str | None = StorageOpt, study: str | None = StudyOpt,
         workers: int = typer.Option(1, "--workers", min=1, help="worker processes to start on this machine"),
         teacher: Path | None = typer.Option(None, "--teacher", help="reuse this teacher folder instead of "
                                             "training one on the tuning split"),
         worker_index: int = typer.Option(0, "--worker-index", min=0, help="seeds this process's sampler; "
                                          "give each process on the same study its own"),
         report: bool = typer.Option(True, "--report/--no-report", help="write the Pareto report at the end")
         ) -> None:
    """Run the study, or join it: take trials until the study holds tune.n_trials, then report."""
    if ctx.invoked_subcommand is not None:
        return
    from varstudent import tune as tuning
    from varstudent.errors import VarstudentError

    settings = _settings(params, set_, storage, study)
    session = _Session(settings, out, worker_index)  # first: a storage that is not usable fails fast
    teacher_dir = tuning.prepare_study_inputs(settings, out, teacher)
    if workers == 1:
        _work_here(session, teacher_dir)
    else:
        procs = _spawn_workers(workers, worker_index, params, list(set_ or []), out, session.url,
                               settings.tune.study_name, teacher_dir.resolve())
        lost = []
        for proc in procs:
            if proc.wait() != 0:
                lost.append(proc)
        if lost:
            host = tuning.worker_name().split(":")[0]
            names = [f"{host}:{p.pid}" for p in lost]
            reason = "worker process ended with status " + ", ".join(str(p.returncode) for p in lost)
            for trial in tuning.fail_orphans(session.study, names, reason):
                session.log_trial(session.study, trial)
            log.warning("%d of %d workers ended abnormally (%s)", len(lost), workers, reason)
        if lost and tuning.budget_left(session.study, settings.tune.n_trials) > 0:
            raise VarstudentError(f"{len(lost)} of {workers} workers failed before the budget was used; "
                                  "run the same command again to continue the study")
    if report:
        session.report()


@tune_app.command("report")
def report_command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt, out: Path = OutOpt,
                   storage: str | None = StorageOpt, study: str | None = StudyOpt) -> None:
    """Redraw the Pareto front (PNG, HTML), its table and trials.csv from the study's storage."""
    report_study(_settings(params, set_, storage, study), out)


def report_study(settings, out: Path) -> dict[str, Any]:
    """The study's Pareto report under OUT/tune/studies/S/report/, logged to its MLflow run (ended once the
    budget is used): `tune report`, and the tune_pick task of the tuning pipeline."""
    return _Session(settings, out, must_exist=True).report()


@tune_app.command("best")
def best_command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt, out: Path = OutOpt,
                 storage: str | None = StorageOpt, study: str | None = StudyOpt,
                 max_accuracy_drop: float | None = typer.Option(None, "--max-accuracy-drop", min=0.0,
                                                                help="accuracy points (%) you give up at most "
                                                                     "against the most accurate Pareto trial "
                                                                     "(default tune.max_accuracy_drop)"),
                 to: Path = typer.Option(Path("best_params.yaml"), "--to", help="params file to write")) -> None:
    """Pick the most compressed Pareto trial within --max-accuracy-drop of the best accuracy and write
    its settings as a params file for `varstudent run --params` / `dvc exp run`."""
    settings = _settings(params, set_, storage, study)
    drop = settings.tune.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    if to.is_dir():  # the atomic write would otherwise name its temporary file in the error
        from varstudent.errors import ConfigError

        raise ConfigError(f"--to {to} is a folder; name the params file to write, e.g. {to / 'best_params.yaml'}")
    write_best(settings, out, drop, to)
