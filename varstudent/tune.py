"""Optuna at the edge: a two-objective study of the distill settings (validation accuracy, compression).

Layout under the artifacts root (OUT):
    OUT/tune/data/       the prepared training data split again: `train` minus a stratified, seeded
                         validation share, and that share stored as the split's `test` (the real test set
                         is never read here)
    OUT/tune/teacher/    the teacher, trained once on that split and reused by every trial
    OUT/tune/studies/S/trials/N/   trial N of study S: its distill and prune outputs (the library's own
                         stage functions); OUT/tune/studies/S/report/ the Pareto front, table and plots
    OUT/tune/study.db    the default storage (sqlite, so trials get heartbeats); an RDB URL or a journal
                         file instead, via tune.storage / --storage

Every process pointed at the same storage and study name takes trials until the study holds
`tune.n_trials` of them (any state), so workers share one budget and a resumed study stops where the
budget ends. Two processes may both start a trial at the last free slot: the study can exceed the budget
by at most (workers - 1) trials.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from varstudent import stages
from varstudent.config import TUNABLE, Params
from varstudent.errors import ConfigError, ServiceError, TrainingError
from varstudent.fileio import write_json

log = logging.getLogger("varstudent")

OBJECTIVES = ("val_accuracy", "compression")
WORKER_ATTR, FAIL_ATTR, DISTILL_ATTR = "worker", "fail_reason", "distill"
MLFLOW_RUN_ATTR = "mlflow_run_id"
STALE_REASON = "no heartbeat within the grace period (worker lost)"
INTERRUPTED_REASON = "interrupted (Ctrl-C)"
SCHEMA_RACE_ATTEMPTS = 4



def tune_dirs(out: Path, study_name: str = "") -> dict[str, Path]:
    """The one place the tuning layout is defined: data and teacher shared by every study under OUT,
    trials and report per study."""
    root = out / "tune"
    study_dir = root / "studies" / re.sub(r"[^A-Za-z0-9_.-]", "_", study_name or "_")
    return {"root": root, "data": root / "data", "teacher": root / "teacher", "trials": study_dir / "trials",
            "report": study_dir / "report"}


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- data and teacher (done once)

def carve_validation(params: Params, prepared_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the training split minus a stratified validation share; that share becomes the split's test set.

    Idempotent: an existing split made from the same data, fraction and seed is kept; one made from
    anything else is an error (its teacher and trials would not be comparable).
    """
    from varstudent.artifacts import read_json
    from varstudent.data import load_prepared, write_prepared

    source = load_prepared(prepared_dir)
    origin = {"source_sha256": source.manifest["sha256"], "validation_fraction": params.tune.validation_fraction,
              "seed": params.seed}
    origin_file = out_dir / "origin.json"
    if (out_dir / "manifest.json").is_file() and origin_file.is_file():
        if read_json(origin_file, "tuning split origin") == origin:
            return origin
        raise ConfigError(f"{out_dir} was split from other data or settings ({origin_file}); "
                          "use another --out or delete it")
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    # load_prepared gives x / 255 in float32; x * 255 rounds back to the exact bytes
    x = (source.x_train * 255).round().to(torch.uint8).numpy()
    y = source.y_train.numpy().astype(np.int64)
    index = np.arange(len(y))
    fit_index, val_index = train_test_split(index, test_size=params.tune.validation_fraction,
                                            random_state=params.seed, stratify=y)
    fit_index, val_index = np.sort(fit_index), np.sort(val_index)
    write_prepared(out_dir, f"{source.manifest['dataset']}:tune", x[fit_index], y[fit_index], x[val_index],
                   y[val_index], list(range(source.num_classes)),
                   extra={"carved_from": source.manifest["sha256"]})  # the teacher's data: stages.distill checks
    write_json(origin_file, origin)
    log.info("tuning split: %d train / %d validation samples (stratified, seed %d)", len(fit_index),
             len(val_index), params.seed)
    return origin


def prepare_study_inputs(params: Params, out: Path, teacher_dir: Path | None,
                         prepared: Path | None = None) -> Path:
    """Prepared data (OUT/prepare unless given; made if missing), the validation split, the teacher (trained
    once unless given); returns the teacher dir."""
    dirs = tune_dirs(out)
    prepared = prepared or out / "prepare"
    if not (prepared / "manifest.json").is_file():
        stages.prepare(params, prepared)
    carve_validation(params, prepared, dirs["data"])
    if teacher_dir is not None:
        if not (teacher_dir / "teacher.json").is_file():
            raise ConfigError(f"--teacher {teacher_dir}: no teacher.json there")
        return teacher_dir
    # kept for every later study under OUT, with the settings it was trained with: a study asking for another
    # teacher (e.g. other teacher.epochs or regularizers) must not silently get this one
    wanted = {"seed": params.seed, "teacher": dataclasses.asdict(params.teacher)}
    settings_file = dirs["teacher"] / "settings.json"
    if not (dirs["teacher"] / "teacher.json").is_file():
        log.info("training the study's teacher once on the tuning split")
        stages.teacher(params, dirs["data"], dirs["teacher"])
        write_json(settings_file, wanted)
    elif settings_file.is_file():
        from varstudent.artifacts import read_json

        kept = read_json(settings_file, "study teacher settings")
        if kept != wanted:  # the teacher section holds only JSON scalars: a direct comparison
            differ = sorted(k for k in wanted["teacher"] if kept.get("teacher", {}).get(k) != wanted["teacher"][k])
            raise ConfigError(f"the study teacher in {dirs['teacher']} was trained with other settings "
                              f"({', '.join(f'teacher.{k}' for k in differ) or 'seed'}); use another --out, "
                              f"or delete that folder to train a new one")
    return dirs["teacher"]


# ---------------------------------------------------------------- storage, sampler, study

@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Heartbeats and metric names are marked experimental in optuna 5; we use them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def storage_url(params: Params, out: Path) -> str:
    url = params.tune.storage
    if url == "auto":
        return f"sqlite:///{(tune_dirs(out)['root'] / 'study.db').resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        try:  # SQLAlchemy's default postgres driver is psycopg2; psycopg 3 is what we ship
            import psycopg2  # noqa: F401
        except ImportError:
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """The URL without its password, for logs and MLflow."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        userinfo, host = rest.split("@", 1)
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else url
    return url


def open_storage(params: Params, url: str,
                 on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> optuna.storages.BaseStorage:
    """An RDB storage (sqlite, PostgreSQL, ...) with heartbeats, or a journal file for any other value."""
    cfg = params.tune
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    from varstudent.services import sqlite_file

    if (database := sqlite_file(url)) is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # several local workers wait for the file lock
    else:
        engine = {"pool_pre_ping": True}
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            with _experimental_ok():
                return optuna.storages.RDBStorage(url, engine_kwargs=engine,
                                                  heartbeat_interval=cfg.heartbeat_interval,
                                                  grace_period=cfg.grace_period,
                                                  heartbeat_stale_trial_callback=on_stale_trial)
        except Exception as exc:  # SQLAlchemy raises many kinds for an unreachable or refused database
            # workers started together on an empty database race to create optuna's tables: the losers
            # find them made by the winner when they try again
            lost_race = any(sign in str(exc) for sign in ("already exists", "UNIQUE constraint failed",
                                                           "duplicate key value"))
            if lost_race and attempt + 1 < SCHEMA_RACE_ATTEMPTS:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise ServiceError(f"Optuna storage {redact(url)} is not usable: "
                               f"{str(exc).strip().splitlines()[0][:200]}") from None
    raise AssertionError("unreachable")


def make_sampler(params: Params, worker_index: int) -> optuna.samplers.BaseSampler:
    # each worker its own seed, or parallel workers would propose the same first generation
    seed = params.seed + worker_index
    cfg = params.tune
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


class _DropLoggedTrainingErrors(logging.Filter):
    """optuna logs every caught trial error with its traceback (~20 lines); a diverged trial's TrainingError
    was already logged in one line by the objective, and its reason is recorded with the trial."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], TrainingError))


def quiet_optuna() -> None:
    """optuna at WARNING, without the traceback of a diverged trial (its handlers: optuna does not propagate)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _DropLoggedTrainingErrors) for f in handler.filters):
            handler.addFilter(_DropLoggedTrainingErrors())


def open_study(params: Params, storage: optuna.storages.BaseStorage, worker_index: int = 0,
               must_exist: bool = False) -> optuna.Study:
    """The study named tune.study_name, created if new; `must_exist` (reading commands): a name the storage
    does not hold is an error, not a new empty study (a typo used to create one and report 0 trials)."""
    quiet_optuna()
    if must_exist:
        names = optuna.study.get_all_study_names(storage)
        if params.tune.study_name not in names:
            raise ConfigError(f"no study {params.tune.study_name!r} in this storage (it holds: "
                              f"{', '.join(sorted(names)) or 'none'}); check --study / tune.study_name")
    try:
        study = optuna.create_study(storage=storage, study_name=params.tune.study_name, load_if_exists=True,
                                    directions=["maximize", "maximize"],
                                    sampler=make_sampler(params, worker_index))
    except ValueError as exc:  # e.g. an existing single-objective study of that name
        raise ConfigError(f"study {params.tune.study_name!r}: {exc}") from None
    if study.metric_names is None:
        with _experimental_ok():
            study.set_metric_names(list(OBJECTIVES))
    return study


# ---------------------------------------------------------------- one trial

def suggest(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """The trial's value of every tunable distill key: searched in its range, or fixed at distill's value."""
    cfg, values = params.tune, {}
    for name in TUNABLE:
        if name in cfg.fixed:
            values[name] = getattr(params.distill, name)
        elif name == "bsr_norm":
            values[name] = trial.suggest_categorical(name, list(cfg.bsr_norm))
        elif name == "kl_warmup_epochs":
            values[name] = trial.suggest_int(name, *cfg.kl_warmup_epochs)
        elif name == "batch_size":
            values[name] = (trial.suggest_categorical(name, list(cfg.batch_size)) if cfg.batch_size
                            else params.distill.batch_size)
        else:
            values[name] = trial.suggest_float(name, *getattr(cfg, name), log=name in cfg.log_scale)
    return values


def trial_params(params: Params, values: dict[str, Any]) -> Params:
    """The run settings of one trial: its distill values; only the compact export (compression is all a
    trial needs); no progress bars."""
    return dataclasses.replace(params, distill=dataclasses.replace(params.distill, **values),
                               export=dataclasses.replace(params.export, formats=("compact",)),
                               runtime=dataclasses.replace(params.runtime, progress=False))


def make_objective(params: Params, out: Path, teacher_dir: Path) -> Callable[[optuna.Trial], tuple[float, float]]:
    dirs = tune_dirs(out, params.tune.study_name)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr(WORKER_ATTR, worker_name())
        values = suggest(trial, params)
        trial.set_user_attr(DISTILL_ATTR, values)
        settings = trial_params(params, values)
        trial_dir = dirs["trials"] / f"{trial.number:05d}"
        started = time.perf_counter()
        try:
            distilled = stages.distill(settings, dirs["data"], teacher_dir, trial_dir / "distill")
        except TrainingError as exc:  # diverged: recorded as FAIL with the reason; the study goes on
            trial.set_user_attr(FAIL_ATTR, str(exc))
            log.warning("trial %d failed: %s", trial.number, exc)
            raise
        except KeyboardInterrupt:  # optuna FAILs the trial and re-raises: say why (else it reads "worker lost")
            trial.set_user_attr(FAIL_ATTR, INTERRUPTED_REASON)
            raise
        pruned = stages.prune(settings, dirs["data"], trial_dir / "distill", trial_dir / "prune")
        student_weights = _student_weights(trial_dir / "distill")
        compression = student_weights / max(pruned["nonzero_weights"], 1)
        accuracy = float(distilled["student_accuracy"])  # on the validation share (the split's test set)
        seconds = time.perf_counter() - started
        for key, value in {"nonzero_weights": pruned["nonzero_weights"], "student_weights": student_weights,
                           "epochs_run": distilled["epochs_run"], "stop_reason": distilled["stop_reason"],
                           "seconds": round(seconds, 2)}.items():
            trial.set_user_attr(key, value)
        log.info("trial %d: validation accuracy %.2f%%, compression %.1fx (%.0f s)", trial.number,
                 100 * accuracy, compression, seconds)
        return accuracy, compression

    return objective


def _student_weights(distill_dir: Path) -> int:
    from varstudent.artifacts import read_json
    from varstudent.nn.architectures import weight_count

    return weight_count(read_json(distill_dir / "student.json", "student spec")["spec"])


# ---------------------------------------------------------------- workers

def budget_left(study: optuna.Study, n_trials: int) -> int:
    """Trials still to start: the budget minus every trial the study holds, whatever its state."""
    return n_trials - len(study.get_trials(deepcopy=False))


def work(study: optuna.Study, params: Params, out: Path, teacher_dir: Path,
         callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]],
         max_trials: int | None = None) -> int:
    """Take trials until the study's budget is used up (or this process ran `max_trials`, its share when
    workers may run one after another); returns how many this process ran."""
    objective = make_objective(params, out, teacher_dir)
    # a lost worker's RUNNING trial past its grace period: optuna fails such trials when a trial starts, but
    # when that trial took the last of the budget none ever starts again, and it stayed RUNNING for good
    with _experimental_ok():
        optuna.storages.fail_stale_trials(study)
    ran, current = 0, {}

    def tracked(trial: optuna.Trial) -> tuple[float, float]:
        current["number"] = trial.number
        return objective(trial)

    while budget_left(study, params.tune.n_trials) > 0 and (max_trials is None or ran < max_trials):
        # one trial per call, so the budget is re-read before each; a stale RUNNING trial of a lost
        # worker is failed by optuna at the start of the next trial (heartbeat storages)
        current.clear()
        try:
            study.optimize(tracked, n_trials=1, catch=(TrainingError,), callbacks=callbacks,
                           gc_after_trial=False, show_progress_bar=False)
        except KeyboardInterrupt:  # optuna skips the callbacks of the trial it failed: its MLflow run too
            if "number" in current:
                interrupted = study.get_trials(deepcopy=False)[current["number"]]
                for callback in callbacks:
                    callback(study, interrupted)
            raise
        ran += 1
    return ran


def fail_orphans(study: optuna.Study, workers: list[str], reason: str) -> list[optuna.trial.FrozenTrial]:
    """FAIL the RUNNING trials of workers known to be gone (no need to wait out the heartbeat grace)."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) in workers:
            try:
                optuna.trial.Trial(study, trial._trial_id).set_user_attr(FAIL_ATTR, reason)
                failed.append(study.tell(trial.number, state=optuna.trial.TrialState.FAIL))
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                pass  # finished meanwhile, or failed by another worker's heartbeat check
    return failed


# ---------------------------------------------------------------- reading a study

def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per trial: number, state, both objectives, the settings, reason and worker."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values if t.state == optuna.trial.TrialState.COMPLETE else None
        row: dict[str, Any] = {"number": t.number, "state": t.state.name,
                               "val_accuracy": values[0] if values else None,
                               "compression": values[1] if values else None}
        row.update({name: t.user_attrs.get(DISTILL_ATTR, t.params).get(name, t.params.get(name))
                    for name in TUNABLE})
        for key in ("nonzero_weights", "epochs_run", "seconds", WORKER_ATTR):
            row[key] = t.user_attrs.get(key)
        reason = t.user_attrs.get(FAIL_ATTR)
        if t.state == optuna.trial.TrialState.FAIL and not reason:
            reason = STALE_REASON
        row[FAIL_ATTR] = reason
        rows.append(row)
    return rows


def pareto_numbers(study: optuna.Study) -> list[int]:
    """Numbers of the completed trials no other completed trial dominates, by compression."""
    front = study.best_trials if any(t.state == optuna.trial.TrialState.COMPLETE
                                     for t in study.get_trials(deepcopy=False)) else []
    return [t.number for t in sorted(front, key=lambda t: t.values[1])]


def choose_tradeoff(rows: list[dict[str, Any]], front: list[int], max_accuracy_drop: float) -> dict[str, Any]:
    """The most compressed Pareto trial whose validation accuracy is within `max_accuracy_drop` points
    (percent) of the best one."""
    candidates = [r for r in rows if r["number"] in front]
    if not candidates:
        raise ConfigError("the study has no completed trial yet")
    best = max(r["val_accuracy"] for r in candidates)
    allowed = [r for r in candidates if 100 * (best - r["val_accuracy"]) <= max_accuracy_drop + 1e-9]
    return max(allowed, key=lambda r: (r["compression"], r["val_accuracy"]))


def params_for_trial(params: Params, row: dict[str, Any]) -> Params:
    """`params` with the trial's distill values; a key the trial lacks (a study older than the key) keeps
    params' value."""
    return dataclasses.replace(params, distill=dataclasses.replace(
        params.distill, **{name: row[name] for name in TUNABLE if row.get(name) is not None}))
