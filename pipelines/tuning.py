"""The tuning pipeline: prepare -> teacher -> N tune_worker tasks (dsl.ParallelFor) sharing one Optuna study ->
tune_pick (the `tune best` rule) -> distill with the chosen settings -> prune -> evaluate -> register.

The workers share the study through tune.storage, a database every worker pod reaches (PostgreSQL on a
cluster; `pipeline run --local` puts a sqlite file in the local pipeline root when it is `auto`). Every stage
after the teacher in `components.STAGES` follows the pick, `register` included when the pipeline is built with
tracking on (as in the training pipeline), so the chosen student is registered. N is kfp.tune_workers, fixed
when the pipeline is compiled.
"""

from __future__ import annotations

from components import ALWAYS, STAGES, TUNING_SECTIONS, build_components, build_tuning_components
from pipelines.training import add_stage_task, expose_run_id, request_training_resources, settings_of, with_parameters
from varstudent.config import Params
from varstudent.errors import ConfigError
from varstudent.pipeline_params import pipeline_parameters

PIPELINE_NAME = "varstudent-tuning"
UPSTREAM = ("prepare", "teacher")  # built before the study; the teacher is trained once and shared


def check_storage(params: Params) -> None:
    if params.tune.storage == "auto":
        raise ConfigError("the tuning pipeline's workers run as separate tasks: set tune.storage to a database "
                          "they all reach, e.g. --set tune.storage=postgresql://user@host/optuna")


def with_storage_password(task, secret: str) -> None:
    """libpq (psycopg) reads the study database's password from PGPASSWORD, set here from a Secret."""
    if secret != "none":
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={"password": "PGPASSWORD"})


def build_tuning_pipeline(params: Params):
    """The tuning pipeline as a KFP GraphComponent; parameter defaults and task settings come from `params`."""
    from kfp import dsl

    check_storage(params)
    parameters = pipeline_parameters(params, study=True)
    name_of = {p.key: p.name for p in parameters}
    components = build_components(params.kfp.image) | build_tuning_components(params.kfp.image)
    run_cfg, workers = params.kfp, params.kfp.tune_workers

    def tuning_pipeline(*args, **kwargs):
        values = dict(zip([p.name for p in parameters], args)) | kwargs
        study_settings = settings_of(values, name_of, ALWAYS + TUNING_SECTIONS)
        tasks = {}
        for spec in STAGES:
            if spec.name in UPSTREAM:
                tasks[spec.name] = add_stage_task(spec, components, tasks,
                                                  settings_of(values, name_of, ALWAYS + spec.sections), run_cfg)
        with dsl.ParallelFor(list(range(workers)), parallelism=workers) as index:
            worker = components["tune_worker"](settings=study_settings, worker_index=index, workers=workers,
                                               prepare=tasks["prepare"].outputs["prepare"],
                                               teacher=tasks["teacher"].outputs["teacher"])
            worker.set_display_name("tune_worker")
            worker.set_caching_options(False)  # the study lives in the storage, not in the task's inputs
            request_training_resources(worker, run_cfg)
            expose_run_id(worker)
            with_storage_password(worker, run_cfg.storage_secret)
        pick = components["tune_pick"](settings=study_settings, trials_run=dsl.Collected(worker.outputs["Output"]))
        pick.set_display_name("tune_pick")
        pick.set_caching_options(False)
        expose_run_id(pick)
        with_storage_password(pick, run_cfg.storage_secret)
        for spec in STAGES:
            if spec.name in UPSTREAM or (spec.tracked_only and not params.tracking.enabled):
                continue
            # distill trains the chosen trial's settings and register records them; the others read only
            # their own sections
            settings = pick.outputs["Output"] if "distill" in spec.sections else \
                settings_of(values, name_of, ALWAYS + spec.sections)
            tasks[spec.name] = add_stage_task(spec, components, tasks, settings, run_cfg)
        return tasks["evaluate"].outputs["metrics"]

    return dsl.pipeline(name=PIPELINE_NAME, description="An Optuna study of the distill settings on parallel "
                        "workers, then distil, prune and evaluate the chosen trade-off (varstudent)")(
        with_parameters(tuning_pipeline, parameters))
