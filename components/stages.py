"""The body of each KFP component: a thin wrapper that hands its artifacts to `components.runtime.run_stage`,
which calls the same stage function as the CLI (`varstudent.cli.call_stage` -> `varstudent.stages`).

KFP copies each function's source into the task's command, so every body imports what it needs itself, and
this module must not use `from __future__ import annotations` (KFP reads the annotations as types).
Each input artifact is named after the stage that produced it; each stage writes its folder as an output
artifact of its own name, plus its metrics.json as a Metrics artifact.
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare(settings: str, prepare: Output[Dataset], metrics: Output[Metrics]):
    from components.runtime import run_stage
    run_stage("prepare", settings, {}, prepare, metrics)


def teacher(settings: str, prepare: Input[Dataset], teacher: Output[Model], metrics: Output[Metrics]):
    from components.runtime import run_stage
    run_stage("teacher", settings, {"prepare": prepare}, teacher, metrics)


def distill(settings: str, prepare: Input[Dataset], teacher: Input[Model], distill: Output[Model],
            metrics: Output[Metrics]):
    from components.runtime import run_stage
    run_stage("distill", settings, {"prepare": prepare, "teacher": teacher}, distill, metrics)


def prune(settings: str, prepare: Input[Dataset], distill: Input[Model], prune: Output[Model],
          metrics: Output[Metrics]):
    from components.runtime import run_stage
    run_stage("prune", settings, {"prepare": prepare, "distill": distill}, prune, metrics)


def evaluate(settings: str, prepare: Input[Dataset], teacher: Input[Model], distill: Input[Model],
             prune: Input[Model], evaluate: Output[Artifact], metrics: Output[Metrics], report: Output[Markdown]):
    from components.runtime import run_stage
    run_stage("evaluate", settings, {"prepare": prepare, "teacher": teacher, "distill": distill, "prune": prune},
              evaluate, metrics, report)


def register(settings: str, prepare: Input[Dataset], teacher: Input[Model], distill: Input[Model],
             prune: Input[Model], evaluate: Input[Artifact], register: Output[Artifact], metrics: Output[Metrics]):
    from components.runtime import run_stage
    run_stage("register", settings, {"prepare": prepare, "teacher": teacher, "distill": distill, "prune": prune,
                                     "evaluate": evaluate}, register, metrics)
