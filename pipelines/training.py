"""The training pipeline: prepare -> teacher -> distill -> prune -> evaluate, built from `components.STAGES`.

Every stage setting is a pipeline parameter with its params.yaml default (varstudent.pipeline_params); the
`kfp` section of params.yaml says how tasks run (image, accelerator, requests, GPU taint, retries).
"""

from __future__ import annotations

import inspect
from pathlib import Path

from components import ALWAYS, STAGES, StageSpec, build_components
from varstudent.config import KfpConfig, Params
from varstudent.pipeline_params import PipelineParameter, keys_of_sections, pipeline_parameters

PIPELINE_NAME = "varstudent-training"


def build_pipeline(params: Params):
    """The pipeline as a KFP GraphComponent; parameter defaults and task settings come from `params`."""
    from kfp import dsl

    parameters = pipeline_parameters(params)
    name_of = {p.key: p.name for p in parameters}
    components = build_components(params.kfp.image)
    run_cfg = params.kfp

    def training_pipeline(*args, **kwargs):
        # KFP calls this with the parameters (as placeholders) in signature order
        values = dict(zip([p.name for p in parameters], args)) | kwargs
        tasks = {}
        for spec in STAGES:
            if spec.tracked_only and not params.tracking.enabled:
                continue
            settings = settings_of(values, name_of, ALWAYS + spec.sections)
            tasks[spec.name] = add_stage_task(spec, components, tasks, settings, run_cfg)
        return tasks["evaluate"].outputs["metrics"]

    return dsl.pipeline(name=PIPELINE_NAME, description="Distil a dense teacher into a sparse variational student, "
                        "prune it, evaluate it (varstudent)")(with_parameters(training_pipeline, parameters))


def settings_of(values: dict, name_of: dict[str, str], sections: tuple[str, ...]) -> str:
    """The `section.key=VALUE` lines of `sections`; formatting a parameter gives a placeholder filled in at run
    time."""
    return "\n".join(f"{key}={values[name_of[key]]}" for key in keys_of_sections(sections))


def with_parameters(function, parameters: list[PipelineParameter]):
    """Give a `*args, **kwargs` pipeline function the signature KFP reads its parameters from."""
    from kfp.dsl import Metrics

    function.__signature__ = inspect.Signature(
        [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=p.type)
         for p in parameters], return_annotation=Metrics)
    function.__annotations__ = {p.name: p.type for p in parameters} | {"return": Metrics}
    return function


def request_training_resources(task, run_cfg: KfpConfig):
    """An accelerator (tolerating the GPU nodes' taint), CPU and memory requests and retries (kfp section)."""
    from kfp import kubernetes

    if run_cfg.accelerator_count > 0:
        task.set_accelerator_type(run_cfg.accelerator_type)
        task.set_accelerator_limit(run_cfg.accelerator_count)
        kubernetes.add_toleration(task, key=run_cfg.gpu_taint, operator="Exists", effect="NoSchedule")
    task.set_cpu_request(run_cfg.cpu_request)
    task.set_memory_request(run_cfg.memory_request)
    if run_cfg.retries:
        task.set_retry(num_retries=run_cfg.retries, backoff_duration="30s")
    return task


# KFP v2 labels every pod of a run with its run id (the driver itself checks it); the stages tag their MLflow runs
# with it. An env var from the pod, not a task input: an input that changes every run would defeat the caching of
# prepare and teacher. kfp.local ignores it; `varstudent pipeline run --local` sets KFP_RUN_ID for its tasks.
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


def expose_run_id(task):
    """Give the task's container the KFP run id as $KFP_RUN_ID (varstudent.tracking tags every run with it)."""
    from kfp import kubernetes

    from varstudent.tracking import KFP_RUN_ID_ENV

    kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ID_ENV, field_path=RUN_ID_FIELD)
    return task


def add_stage_task(spec: StageSpec, components: dict, tasks: dict, settings, run_cfg: KfpConfig):
    """The task of one stage, reading its upstream stages' output artifacts from `tasks`."""
    task = components[spec.name](settings=settings, **{up: tasks[up].outputs[up] for up in spec.inputs})
    task.set_display_name(spec.name)
    task.set_caching_options(spec.cache)
    expose_run_id(task)
    if spec.training:
        request_training_resources(task, run_cfg)
    return task


def compile_pipeline(params: Params, path: Path, builder=build_pipeline) -> Path:
    """Write the pipeline's IR YAML (what `varstudent pipeline compile` and `submit` use); `builder` makes the
    pipeline (build_pipeline, or pipelines.tuning.build_tuning_pipeline)."""
    from kfp import compiler

    pipeline = builder(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    return path
