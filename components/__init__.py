"""Kubeflow Pipelines v2 components, one per stage, each a thin wrapper of the stage function the CLI calls.

`STAGES` is the one table the pipeline is built from: a stage's component body, the upstream stages whose
output artifacts it reads (in dependency order), the params sections it reads (only those reach its task, so
a changed distill setting does not invalidate the cached teacher), and how the task runs. A new stage (e.g.
`register`) is one body in components/stages.py and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from components import stages as bodies
from components import tuning as tuning_bodies

ALWAYS = ("seed", "runtime", "tracking", "services")  # every stage: seeding, device, its MLflow run


@dataclass(frozen=True)
class StageSpec:
    name: str
    body: Callable
    inputs: tuple[str, ...]  # upstream stages; their output artifacts are this component's inputs
    sections: tuple[str, ...]  # params sections this stage reads (plus ALWAYS); `train` (checkpoints) is CLI-only
    training: bool = False  # requests an accelerator, tolerates the GPU taint, retried
    cache: bool = False
    tracked_only: bool = False  # only in pipelines built with tracking.enabled (it needs an MLflow registry)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", bodies.prepare, (), ("data", "validate"), cache=True),
    StageSpec("teacher", bodies.teacher, ("prepare",), ("data", "teacher"), training=True, cache=True),
    StageSpec("distill", bodies.distill, ("prepare", "teacher"), ("data", "teacher", "student", "distill", "prune"),
              training=True),
    StageSpec("prune", bodies.prune, ("prepare", "distill"), ("prune", "export")),
    StageSpec("evaluate", bodies.evaluate, ("prepare", "teacher", "distill", "prune"), ("evaluate",)),
    StageSpec("register", bodies.register, ("prepare", "teacher", "distill", "prune", "evaluate"),
              ("data", "validate", "teacher", "student", "distill", "prune", "export", "evaluate", "train", "register"),
              tracked_only=True),  # every section: the version is tagged with the digest of all settings
)


def build_components(image: str) -> dict[str, Callable]:
    """The KFP components, all on `image` (params.yaml kfp.image, the one place it is set).

    install_kfp_package=False: the image already has kfp and varstudent; nothing is pip-installed at run time.
    """
    from kfp import dsl

    return {spec.name: dsl.component(spec.body, base_image=image, install_kfp_package=False) for spec in STAGES}


# the tuning pipeline's own steps: study workers and the pick read every stage's sections plus `tune`; the pick
# hands the chosen settings to the stages that read the distill section (distill, register)
TUNING_SECTIONS = tuple(dict.fromkeys(section for spec in STAGES for section in spec.sections)) + ("tune",)
PICKED_SECTIONS = tuple(dict.fromkeys(ALWAYS + tuple(section for spec in STAGES if "distill" in spec.sections
                                                     for section in spec.sections)))


def build_tuning_components(image: str) -> dict[str, Callable]:
    from kfp import dsl

    return {body.__name__: dsl.component(body, base_image=image, install_kfp_package=False)
            for body in (tuning_bodies.tune_worker, tuning_bodies.tune_pick)}
