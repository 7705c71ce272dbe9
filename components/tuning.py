"""The bodies of the tuning pipeline's own components, thin wrappers of `components.runtime` (which calls the
same functions as `varstudent tune` and `varstudent tune best`). No `from __future__ import annotations`
here either: KFP reads the annotations as types.
"""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def tune_worker(settings: str, worker_index: int, workers: int, prepare: Input[Dataset], teacher: Input[Model],
                tune_worker: Output[Artifact], metrics: Output[Metrics]) -> int:
    from components.runtime import run_tune_worker
    return run_tune_worker(settings, worker_index, workers, prepare, teacher, tune_worker, metrics)


def tune_pick(settings: str, trials_run: list[int], chosen: Output[Artifact], metrics: Output[Metrics]) -> str:
    # trials_run (what every worker ran) is the fan-in that starts this task after the last worker
    from components.runtime import run_tune_pick
    ran = [int(n) for n in trials_run]  # parameters travel as doubles
    print(f"varstudent: the workers ran {sum(ran)} trials ({ran})", flush=True)
    return run_tune_pick(settings, chosen, metrics)

