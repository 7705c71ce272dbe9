"""The Optuna study: validation split, shared storage across worker processes, a killed worker, a diverging
trial, resume within the budget, the reported Pareto set, `tune best`, MLflow nesting. Tiny digits nets."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from tests.conftest import assert_clean_error, cli
from tests.pg import free_port
from varstudent import tune
from varstudent.cli_tune import _Session
from varstudent.config import TUNABLE, load_params
from varstudent.data import load_prepared
from varstudent.errors import ConfigError

TINY = ["data.dataset=digits", "teacher.arch=mlp-64", "teacher.epochs=2", "student.arch=mlp-32",
        "distill.epochs=3", "distill.converge_tol=0", "tune.kl_warmup_epochs=[0,2]", "tune.population_size=4",
        "runtime.progress=false"]


def tiny(tmp: Path, *extra: str) -> list[str]:
    return [*TINY, f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}", *extra]


def prepared_out(tmp: Path, digits_dir: Path) -> Path:
    """An artifacts root whose prepare/ is the session's digits (no second prepare)."""
    out = tmp / "art"
    out.mkdir()
    (out / "prepare").symlink_to(digits_dir, target_is_directory=True)
    return out


def _rows_by_pixels(x: np.ndarray) -> list[bytes]:
    return sorted(row.tobytes() for row in x.reshape(len(x), -1))


def test_validation_split_is_stratified_from_the_training_data_only(tmp_path: Path, digits_dir: Path) -> None:
    params = load_params(None, tiny(tmp_path, "tune.validation_fraction=0.25"))
    split = tmp_path / "split"
    tune.carve_validation(params, digits_dir, split)
    source, carved = load_prepared(digits_dir), load_prepared(split)
    as_u8 = lambda t: (t * 255).round().numpy().astype(np.uint8)  # noqa: E731
    # train + validation is exactly the original training set; the real test set is not touched
    assert _rows_by_pixels(np.concatenate([as_u8(carved.x_train), as_u8(carved.x_test)])) == \
        _rows_by_pixels(as_u8(source.x_train))
    assert len(carved.y_test) == math.ceil(0.25 * len(source.y_train))  # scikit-learn rounds up
    share = np.bincount(carved.y_test.numpy(), minlength=10) / np.bincount(source.y_train.numpy(), minlength=10)
    assert np.all(np.abs(share - 0.25) < 0.03), share  # stratified: every class ~25 % held out
    # a second call keeps the split (no file rewritten); other settings on the same folder are refused
    stamps = lambda: {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in split.iterdir()}  # noqa: E731
    before = stamps()
    assert {"manifest.json", "origin.json"} <= set(before)
    tune.carve_validation(params, digits_dir, split)
    assert stamps() == before
    with pytest.raises(ConfigError, match="split from other data or settings"):
        tune.carve_validation(load_params(None, tiny(tmp_path, "tune.validation_fraction=0.3")), digits_dir, split)
    assert stamps() == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter vd_weight:UserWarning")  # the enqueued 1e38 on purpose
def test_diverging_trial_fails_with_its_reason_the_study_goes_on_and_mlflow_nests_every_trial(
        tmp_path: Path, digits_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = prepared_out(tmp_path, digits_dir)
    params = load_params(None, tiny(tmp_path, "tune.n_trials=3"))
    teacher_dir = tune.prepare_study_inputs(params, out, None)
    session = _Session(params, out)
    # a KL weight of 1e38 makes the loss infinite in float32 at the first batch: a real divergence
    session.study.enqueue_trial({"vd_weight": 1e38, "kl_warmup_epochs": 0}, skip_if_exists=False)
    ran = tune.work(session.study, params, out, teacher_dir, [session.log_trial])
    trials = session.study.get_trials()
    assert ran == 3 and [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert "loss is inf" in trials[0].user_attrs[tune.FAIL_ATTR]
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials[1:]:
        accuracy, compression = t.values
        assert 0 < accuracy <= 1 and compression >= 1

    client = MlflowClient(params.tracking.uri)
    parent = session.study.user_attrs[tune.MLFLOW_RUN_ATTR]
    experiment = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_number) == [0, 1, 2] and len(children) == 3
    assert by_number[0].info.status == "FAILED" and "loss is inf" in by_number[0].data.tags["optuna.fail_reason"]
    assert by_number[1].data.tags["optuna.state"] == "COMPLETE"
    assert by_number[1].data.metrics["val_accuracy"] == pytest.approx(trials[1].values[0])
    assert by_number[1].data.params["lr"] == str(trials[1].params["lr"])


def test_a_study_asking_for_another_teacher_is_refused_the_one_kept_under_out(tmp_path: Path,
                                                                              digits_dir: Path) -> None:
    out = prepared_out(tmp_path, digits_dir)
    first = load_params(None, tiny(tmp_path, "tracking.enabled=false"))
    teacher_dir = tune.prepare_study_inputs(first, out, None)
    made = (teacher_dir / "teacher.safetensors").stat().st_mtime_ns
    assert tune.prepare_study_inputs(first, out, None) == teacher_dir  # the same settings: reused
    assert (teacher_dir / "teacher.safetensors").stat().st_mtime_ns == made
    regularized = load_params(None, tiny(tmp_path, "tracking.enabled=false", "teacher.dropout=0.5"))
    with pytest.raises(ConfigError, match=r"trained with other settings \(teacher.dropout\); use another --out"):
        tune.prepare_study_inputs(regularized, out, None)


def test_batch_size_is_searched_only_when_given_choices_and_reaches_the_training(
        tmp_path: Path, digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = prepared_out(tmp_path, digits_dir)
    trained_with: dict[int, int] = {}
    real_distill = tune.stages.distill

    def spy(settings, data_dir, teacher_dir, out_dir, *args, **kwargs):  # the real stage, its batch noted
        trained_with[int(Path(out_dir).parent.name)] = settings.distill.batch_size
        return real_distill(settings, data_dir, teacher_dir, out_dir, *args, **kwargs)

    monkeypatch.setattr(tune.stages, "distill", spy)
    searched = load_params(None, tiny(tmp_path, "tune.n_trials=4", "tracking.enabled=false", "tune.sampler=random",
                                      "tune.batch_size=[16,64]", "distill.epochs=1"))
    teacher_dir = tune.prepare_study_inputs(searched, out, None)
    study = tune.open_study(searched, tune.open_storage(searched, tune.storage_url(searched, out)))
    assert tune.work(study, searched, out, teacher_dir, []) == 4
    trials = study.get_trials()
    assert {t.number: t.params["batch_size"] for t in trials} == trained_with
    assert set(trained_with.values()) <= {16, 64}
    rows = tune.trial_rows(study)
    assert [r["batch_size"] for r in rows] == [trained_with[r["number"]] for r in rows]
    assert tune.params_for_trial(searched, rows[0]).distill.batch_size == trained_with[rows[0]["number"]]

    # the default, [], is not a search: every trial trains with distill.batch_size and optuna sees no parameter
    trained_with.clear()
    plain = load_params(None, tiny(tmp_path, "tune.n_trials=1", "tracking.enabled=false", "tune.study_name=plain",
                                   "distill.batch_size=48", "distill.epochs=1"))
    study = tune.open_study(plain, tune.open_storage(plain, tune.storage_url(plain, out)))
    assert tune.work(study, plain, out, teacher_dir, []) == 1
    assert list(trained_with.values()) == [48] and "batch_size" not in study.get_trials()[0].params
    # a trial of a study older than the key has no batch_size: `tune best` keeps the params' value
    old_row = {**tune.trial_rows(study)[0], "batch_size": None}
    assert tune.params_for_trial(searched, old_row).distill.batch_size == searched.distill.batch_size


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # study.ask() below, on purpose
def test_a_resumed_study_continues_to_its_total_budget(tmp_path: Path, digits_dir: Path) -> None:
    out = prepared_out(tmp_path, digits_dir)
    first = load_params(None, tiny(tmp_path, "tune.n_trials=2", "tracking.enabled=false"))
    teacher_dir = tune.prepare_study_inputs(first, out, None)
    storage = tune.open_storage(first, tune.storage_url(first, out))
    assert tune.work(tune.open_study(first, storage), first, out, teacher_dir, []) == 2
    more = load_params(None, tiny(tmp_path, "tune.n_trials=3", "tracking.enabled=false"))
    assert tune.work(tune.open_study(more, storage), more, out, teacher_dir, []) == 1
    study = tune.open_study(more, storage)
    assert tune.work(study, more, out, teacher_dir, []) == 0  # budget used: nothing more
    assert [t.number for t in study.get_trials()] == [0, 1, 2]
    assert (tune.tune_dirs(out)["root"] / "study.db").is_file()  # the default storage: a local sqlite file

    # a RUNNING trial of a worker known to be dead is failed at once, with the reason; others are left alone
    orphan, alive = study.ask(), study.ask()
    orphan.set_user_attr(tune.WORKER_ATTR, "host:1")
    alive.set_user_attr(tune.WORKER_ATTR, "host:2")
    failed = tune.fail_orphans(study, ["host:1"], "worker process ended with status -9")
    assert [t.number for t in failed] == [orphan.number]
    states = {t.number: t for t in study.get_trials()}
    assert states[orphan.number].state == optuna.trial.TrialState.FAIL
    assert states[orphan.number].user_attrs[tune.FAIL_ATTR] == "worker process ended with status -9"
    assert states[alive.number].state == optuna.trial.TrialState.RUNNING

    # reading commands (`tune report`, `tune best`) name a study: a typo is an error, not a new empty study
    typo = load_params(None, tiny(tmp_path, "tracking.enabled=false", "tune.study_name=typo"))
    with pytest.raises(ConfigError, match="no study 'typo' in this storage"):
        tune.open_study(typo, storage, must_exist=True)
    assert "typo" not in optuna.study.get_all_study_names(storage)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # study.ask() below, on purpose
def test_a_lost_workers_trial_that_took_the_last_of_the_budget_is_failed_by_the_next_worker(
        tmp_path: Path, digits_dir: Path) -> None:
    out = prepared_out(tmp_path, digits_dir)
    params = load_params(None, tiny(tmp_path, "tune.n_trials=1", "tracking.enabled=false",
                                    "tune.heartbeat_interval=1", "tune.grace_period=2"))
    teacher_dir = tune.prepare_study_inputs(params, out, None)
    storage = tune.open_storage(params, tune.storage_url(params, out))
    study = tune.open_study(params, storage)
    lost = study.ask()  # the budget's only trial, taken by a worker that then died
    storage.record_heartbeat(lost._trial_id)
    time.sleep(3.5)  # past the grace period (2 s), with room for the storage's whole-second timestamps
    assert tune.work(tune.open_study(params, storage), params, out, teacher_dir, []) == 0  # no budget left
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL  # not RUNNING for ever
    assert tune.trial_rows(study)[0]["fail_reason"] == tune.STALE_REASON


def test_ctrl_c_fails_the_running_trial_with_its_reason_and_still_reports_it(tmp_path: Path, digits_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = prepared_out(tmp_path, digits_dir)
    params = load_params(None, tiny(tmp_path, "tune.n_trials=2", "tracking.enabled=false"))
    teacher_dir = tune.prepare_study_inputs(params, out, None)
    study = tune.open_study(params, tune.open_storage(params, tune.storage_url(params, out)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune.stages, "distill", interrupted)
    reported = []
    with pytest.raises(KeyboardInterrupt):
        tune.work(study, params, out, teacher_dir, [lambda s, t: reported.append((t.number, t.state))])
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.FAIL
    assert tune.trial_rows(study)[0]["fail_reason"] == tune.INTERRUPTED_REASON  # not "worker lost"
    assert reported == [(0, optuna.trial.TrialState.FAIL)]  # the MLflow callback sees it too


def test_a_diverged_trial_is_one_warning_line_not_optunas_traceback() -> None:
    import io
    import logging

    from varstudent.errors import TrainingError

    tune.quiet_optuna()
    handlers = [h for h in logging.getLogger("optuna").handlers if isinstance(h, logging.StreamHandler)]
    assert handlers  # optuna's own stderr handler (it does not propagate to the root logger)
    stream = io.StringIO()
    previous = [h.setStream(stream) for h in handlers]
    try:
        child = logging.getLogger("optuna.study._optimize")  # where optuna logs a caught trial error
        for error in (TrainingError("loss is inf at epoch 1"), ValueError("a real bug")):
            try:
                raise error
            except Exception as exc:
                child.warning("Trial 0 failed because of the following error: %r", exc, exc_info=True)
    finally:
        for h, p in zip(handlers, previous):
            h.setStream(p)
    text = stream.getvalue()
    assert "TrainingError" not in text  # dropped: the objective logged it in one line
    assert "a real bug" in text and "Traceback" in text  # anything else keeps optuna's full report


def _dominates(a: dict, b: dict) -> bool:
    return a["val_accuracy"] >= b["val_accuracy"] and a["compression"] >= b["compression"] and \
        (a["val_accuracy"] > b["val_accuracy"] or a["compression"] > b["compression"])


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["number"] = int(r["number"])
        for key in ("val_accuracy", "compression"):
            r[key] = float(r[key]) if r[key] else None
    return rows


def _wait_for_running_trial(storage: optuna.storages.BaseStorage, name: str, deadline: float
                            ) -> optuna.trial.FrozenTrial:
    while time.time() < deadline:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                       if t.user_attrs.get(tune.WORKER_ATTR)]
            if running:
                return running[0]
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started in time")


@pytest.mark.slow
def test_four_workers_share_one_postgres_study_and_a_killed_worker_does_not_block_it(
        tmp_path: Path, digits_dir: Path, postgres_url: str) -> None:
    from mlflow.tracking import MlflowClient

    out = prepared_out(tmp_path, digits_dir)
    n_trials = 10
    overrides = tiny(tmp_path, f"tune.n_trials={n_trials}", "tune.heartbeat_interval=1", "tune.grace_period=2",
                     "distill.epochs=5")
    args = [a for o in overrides for a in ("--set", o)]
    main = subprocess.Popen([sys.executable, "-m", "varstudent.cli", "tune", "--workers", "4", "--storage",
                             postgres_url, "--study", "shared", "--out", str(out), *args], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = tune.storage_url(load_params(None, [f"tune.storage={postgres_url}"]), out)
    storage = optuna.storages.RDBStorage(url)  # one connection pool for all the polling below
    victim = _wait_for_running_trial(storage, "shared", time.time() + 180)
    os.kill(int(victim.user_attrs[tune.WORKER_ATTR].rsplit(":", 1)[1]), signal.SIGKILL)
    stdout, stderr = main.communicate(timeout=300)
    assert main.returncode == 0, stderr[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    # every trial recorded once, numbered 0..M-1; the budget holds up to the race of the last free slot
    assert sorted(numbers) == list(range(len(trials)))
    assert n_trials <= len(trials) <= n_trials + 3
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    killed = study.get_trials()[victim.number]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= n_trials - 1
    workers = {t.user_attrs[tune.WORKER_ATTR] for t in trials if tune.WORKER_ATTR in t.user_attrs}
    assert len(workers) >= 3, workers  # the work was shared

    # one nested MLflow run per trial, none twice, the killed one FAILED with a reason
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    parent = study.user_attrs[tune.MLFLOW_RUN_ATTR]
    experiment = client.get_experiment_by_name("varstudent").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    logged = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert logged == sorted(numbers)
    killed_run = next(r for r in children if int(r.data.tags["optuna.trial_number"]) == victim.number)
    assert killed_run.info.status == "FAILED" and killed_run.data.tags.get("optuna.fail_reason")

    # the reported Pareto set: non-dominated against every completed trial, and nothing missing from it
    report = tune.tune_dirs(out, "shared")["report"]
    every, front = _read_csv(report / "trials.csv"), _read_csv(report / "pareto.csv")
    completed = [r for r in every if r["state"] == "COMPLETE"]
    # the CSV lists every trial of the study once, in its final state, with the study's objective values
    assert sorted(r["number"] for r in every) == sorted(numbers)
    done = {t.number: t.values for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert {r["number"]: [r["val_accuracy"], r["compression"]] for r in completed} == done
    assert front and {r["number"] for r in front} <= {r["number"] for r in completed}
    for f in front:
        assert not any(_dominates(c, f) for c in completed), f
    front_numbers = {r["number"] for r in front}
    for c in completed:
        assert c["number"] in front_numbers or any(_dominates(f, c) for f in front), c
    for name in ("pareto.png", "pareto.html", "pareto.md"):
        assert (report / name).stat().st_size > 0
    assert "Pareto front" in stdout

    # `tune best`: the most compressed front trial within the accuracy drop, as a params file `run` reads
    chosen_file = tmp_path / "best.yaml"
    result = cli("tune", "best", "--storage", postgres_url, "--study", "shared", "--out", str(out),
                 "--max-accuracy-drop", "1.0", "--to", str(chosen_file), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    top = max(r["val_accuracy"] for r in front)
    allowed = [r for r in front if 100 * (top - r["val_accuracy"]) <= 1.0 + 1e-9]
    expected = max(allowed, key=lambda r: (r["compression"], r["val_accuracy"]))
    assert f"trial {expected['number']}:" in result.stdout
    written = load_params(chosen_file)
    for name in TUNABLE:
        want = expected[name]
        got = getattr(written.distill, name)
        assert (got == want) if isinstance(got, str) else got == pytest.approx(float(want)), name


def test_bad_tune_settings_and_an_unreachable_storage_are_one_line_errors(tmp_path: Path) -> None:
    bad_range = cli("tune", "--set", "tune.lr=[0.01,0.001]", cwd=tmp_path)
    assert_clean_error(bad_range, "tune.lr: low 0.01 is above high 0.001")
    nobody_listens = f"postgresql://u:secret@127.0.0.1:{free_port()}/optuna"
    refused = cli("tune", "--storage", nobody_listens, "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(refused, "Optuna storage postgresql+psycopg://u:***@127.0.0.1")
    assert "secret" not in refused.stderr
    assert not (tmp_path / "artifacts").exists()  # failed before preparing data or training a teacher
    for command in ("report", "best"):  # no storage at all: said so, and none created (it once made an empty one)
        missing = cli("tune", command, "--study", "typo", "--set", "tracking.enabled=false", cwd=tmp_path)
        assert_clean_error(missing, "no study storage at", "run `varstudent tune` with this --out first")
        assert not (tmp_path / "artifacts").exists()
    (tmp_path / "artifacts" / "tune").mkdir(parents=True)  # a storage holding no study of that name
    import optuna

    optuna.create_study(storage=f"sqlite:///{tmp_path / 'artifacts/tune/study.db'}", study_name="other")
    for command in ("report", "best"):
        typo = cli("tune", command, "--study", "typo", "--set", "tracking.enabled=false", cwd=tmp_path)
        assert_clean_error(typo, "no study 'typo' in this storage (it holds: other)")
    folder = cli("tune", "best", "--to", str(tmp_path), "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(folder, f"--to {tmp_path} is a folder; name the params file to write")
