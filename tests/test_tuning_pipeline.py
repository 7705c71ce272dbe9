"""The KFP tuning pipeline: workers fanned out by dsl.ParallelFor on one Optuna study, the trade-off pick after
them, and distill -> prune -> evaluate on the picked settings; a local run with 2 workers on a sqlite study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, assert_clean_error, cli
from tests.test_pipeline import TINY, _read_ir, _sets
from varstudent.config import TUNABLE, load_params
from varstudent.stages import timing_key

PG_URL = "postgresql://optuna@db.cluster.local/optuna"


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ir")
    result = cli("pipeline", "compile", "--pipeline", "tuning", "--params", str(REPO / "params.yaml"),
                 "--set", f"tune.storage={PG_URL}", "--set", "kfp.tune_workers=3",
                 "--set", "kfp.storage_secret=optuna-db", "--output",
                 str(out / "t.yaml"), cwd=out)
    assert result.returncode == 0, result.stderr
    return _read_ir(out / "t.yaml")


def test_ir_fans_out_workers_then_picks_then_trains(ir: dict) -> None:
    tasks = ir["root"]["dag"]["tasks"]
    (loop_name,) = [name for name, task in tasks.items() if "parameterIterator" in task]
    assert set(tasks) == {"prepare", "teacher", loop_name, "tune-pick", "distill", "prune", "evaluate",
                          "register"}  # params.yaml has tracking on: the picked student is registered
    loop = tasks[loop_name]
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2]  # kfp.tune_workers
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3  # all at once
    assert sorted(loop["dependentTasks"]) == ["prepare", "teacher"]
    body = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == {"tune-worker"}
    # every worker reads the one teacher trained upstream, and its index is the loop item
    worker_inputs = body["tune-worker"]["inputs"]
    assert worker_inputs["artifacts"]["teacher"] == {"componentInputArtifact": "pipelinechannel--teacher-teacher"}
    assert "componentInputParameter" in worker_inputs["parameters"]["worker_index"]
    assert worker_inputs["parameters"]["workers"]["runtimeValue"]["constant"] == 3
    # the pick waits for all workers (their outputs collected), distill trains what the pick returns
    assert tasks["tune-pick"]["dependentTasks"] == [loop_name]
    assert tasks["tune-pick"]["inputs"]["parameters"]["trials_run"]["taskOutputParameter"]["producerTask"] == \
        loop_name
    assert tasks["distill"]["inputs"]["parameters"]["settings"] == \
        {"taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "tune-pick"}}
    # register records the settings it was trained with: the pick's, like distill
    assert tasks["register"]["inputs"]["parameters"]["settings"] == tasks["distill"]["inputs"]["parameters"][
        "settings"]
    assert "evaluate" in tasks["register"]["dependentTasks"]
    deps = {name: sorted(tasks[name].get("dependentTasks", [])) for name in ("distill", "prune", "evaluate")}
    assert deps == {"distill": ["prepare", "teacher", "tune-pick"], "prune": ["distill", "prepare"],
                    "evaluate": ["distill", "prepare", "prune", "teacher"]}


def test_ir_workers_request_the_accelerator_and_take_the_study_settings(ir: dict) -> None:
    kfp = load_params(REPO / "params.yaml").kfp
    executors = ir["deploymentSpec"]["executors"]
    with_gpu = {name.removeprefix("exec-") for name, ex in executors.items()
                if "accelerator" in ex["container"].get("resources", {})}
    assert with_gpu == {"teacher", "tune-worker", "distill"}
    assert executors["exec-tune-worker"]["container"]["resources"]["accelerator"]["resourceCount"] == \
        str(kfp.accelerator_count)
    platform = ir["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-tune-worker"]["tolerations"] == \
        [{"key": kfp.gpu_taint, "operator": "Exists", "effect": "NoSchedule"}]
    # the study database's password comes from a Secret, into the tasks that open the study and no others
    with_secret = {name.removeprefix("exec-"): spec["secretAsEnv"] for name, spec in platform.items()
                   if "secretAsEnv" in spec}
    assert set(with_secret) == {"tune-worker", "tune-pick"}
    assert all(env[0]["secretName"] == "optuna-db" and env[0]["keyToEnv"] == [{"envVar": "PGPASSWORD",
                                                                              "secretKey": "password"}]
               for env in with_secret.values())
    declared = ir["root"]["inputDefinitions"]["parameters"]
    assert declared["tune_storage"]["defaultValue"] == PG_URL
    assert declared["tune_max_accuracy_drop"]["defaultValue"] == 0.5
    assert json.loads(declared["tune_kd_weight"]["defaultValue"]) == [0.0, 2.0]  # ranges travel as JSON
    assert not any(name.startswith("kfp_") for name in declared)
    tasks = ir["root"]["dag"]["tasks"]
    assert not tasks["tune-pick"]["cachingOptions"].get("enableCache")


def test_the_tuning_pipeline_needs_a_shared_storage(tmp_path: Path) -> None:
    result = cli("pipeline", "compile", "--pipeline", "tuning", "--params", str(REPO / "params.yaml"), cwd=tmp_path)
    assert_clean_error(result, "tune.storage")
    assert_clean_error(cli("pipeline", "compile", "--pipeline", "tunning", cwd=tmp_path), "--pipeline")


@pytest.mark.slow
def test_local_run_shares_one_study_and_trains_the_picked_trial(tmp_path: Path) -> None:
    import optuna

    from varstudent import tune

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study_settings = [*TINY, "export.formats=[compact]", "kfp.tune_workers=2", "tune.n_trials=4",
                      "tune.population_size=2", "tune.kl_warmup_epochs=[0, 2]", f"tune.storage={url}"]
    env = {"OMP_NUM_THREADS": "1"}  # the same floating-point sums as the direct distill below
    result = cli("pipeline", "run", "--local", "--pipeline", "tuning", *_sets(study_settings), "--root",
                 str(tmp_path / "root"), "--out", str(tmp_path / "published"), cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "varstudent: error" not in result.stdout  # no worker failed (and was retried)
    (run,) = list((tmp_path / "root").iterdir())

    # one study, every trial recorded once, the budget split between the two workers
    study = optuna.load_study(study_name="varstudent", storage=url)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    per_worker: dict[str, int] = {}
    for t in trials:
        per_worker[t.user_attrs[tune.WORKER_ATTR]] = per_worker.get(t.user_attrs[tune.WORKER_ATTR], 0) + 1
    assert sorted(per_worker.values()) == [2, 2]
    trial_dirs = sorted(p.name for p in run.glob("*/tune-worker/tune_worker/tune/studies/*/trials/*"))
    assert trial_dirs == ["00000", "00001", "00002", "00003"]  # each trial run by exactly one worker

    # the pick applied the `tune best` rule to the study
    rows = tune.trial_rows(study)
    expected = tune.choose_tradeoff(rows, tune.pareto_numbers(study), 0.5)
    pick_metrics = json.loads((run / "tune-pick" / "executor_output.json").read_text())
    assert pick_metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]["trial_number"] == expected["number"]
    report = next(run.glob("tune-pick/chosen/tune/studies/*/report"))  # the Pareto report travels too
    assert {"pareto.png", "pareto.html", "trials.csv"} <= {p.name for p in report.iterdir()}
    best_file = run / "tune-pick" / "chosen" / "best_params.yaml"
    chosen = yaml.safe_load(best_file.read_text())["distill"]
    picked_trial = study.trials[expected["number"]]
    assert {k: chosen[k] for k in TUNABLE} == picked_trial.user_attrs[tune.DISTILL_ATTR]
    defaults = load_params(REPO / "params.yaml").distill
    assert chosen["lr"] != defaults.lr  # sampled, so the default settings would have trained another student

    # and the final distill trained exactly those settings: the CLI's distill with the params file, on the
    # run's data and teacher, gives the same history
    direct = tmp_path / "direct"
    for stage in ("prepare", "teacher"):
        shutil.copytree(run / stage / stage, direct / stage)
    again = cli("distill", "--params", str(best_file), "--out", str(direct), cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]

    def history(folder: Path) -> list[dict]:
        return [{k: v for k, v in epoch.items() if not timing_key(k)}
                for epoch in json.loads((folder / "history.json").read_text())]

    assert history(run / "distill" / "distill") == history(direct / "distill")
    assert (tmp_path / "published" / "evaluate" / "metrics.json").is_file()
    assert not (run / "register").exists()  # tracking is off here: nothing to register into
    assert "the chosen trial's settings:" in result.stdout


def test_a_local_run_puts_an_auto_study_in_the_pipeline_root(tmp_path: Path) -> None:
    from varstudent.cli_pipeline import local_study_storage

    params = load_params(REPO / "params.yaml", ["tune.study_name=mlp a/b"])
    assert local_study_storage(params, tmp_path).tune.storage == f"sqlite:///{tmp_path.resolve()}/study-mlp_a_b.db"
    chosen = load_params(REPO / "params.yaml", [f"tune.storage={PG_URL}"])
    assert local_study_storage(chosen, tmp_path).tune.storage == PG_URL  # a storage given is kept


def test_workers_racing_to_create_the_study_tables_wait_for_the_winner(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Tasks started at once on an empty database: all but one find optuna's tables made meanwhile."""
    import optuna

    from varstudent import tune
    from varstudent.errors import ServiceError

    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.OperationalError) table studies already exists")
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(tune.time, "sleep", lambda _s: None)
    params = load_params(REPO / "params.yaml")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert isinstance(tune.open_storage(params, url), real) and len(calls) == 2

    def always(url, **kwargs):
        raise RuntimeError("relation studies already exists")

    monkeypatch.setattr(optuna.storages, "RDBStorage", always)
    with pytest.raises(ServiceError, match="already exists"):  # a real clash is still reported, once
        tune.open_storage(params, url)
