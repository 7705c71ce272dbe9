"""`varstudent pipeline compile|run --local|submit|schedule`: the stages as one Kubeflow pipeline.

The edge of the library towards kfp (imported only inside these commands): the pipeline itself is built in
pipelines/training.py from the components in components/.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import typer

from varstudent.errors import ConfigError, ServiceError, VarstudentError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run the five stages as one Kubeflow pipeline: locally, on a cluster, on a schedule.")

# the same options as the stage commands (varstudent.cli imports this module, so they are not imported from it)
ParamsOpt = typer.Option(None, "--params", help="params file (every setting lives here) [default: ./params.yaml "
                         "if there is one, else the built-in defaults]")
SetOpt = typer.Option(None, "--set", help="override one setting, e.g. --set distill.epochs=5 (repeatable)")
OutOpt = typer.Option(Path("artifacts"), "--out", help="artifacts root; the compiled pipeline goes to OUT/kfp/")
HostOpt = typer.Option(..., "--host", help="KFP API endpoint, e.g. http://localhost:8080 (port-forwarded "
                       "ml-pipeline-ui)")
ExperimentOpt = typer.Option("varstudent", "--experiment", help="KFP experiment the runs are filed under")
PipelineOpt = typer.Option("training", "--pipeline", help="training (the five stages) or tuning (an Optuna "
                           "study on kfp.tune_workers parallel workers, then the chosen trade-off trained)")
AccountOpt = typer.Option("varstudent-pipeline", "--service-account",
                          help="Kubernetes service account of the run's pods (infra/ creates this one)")


def _load(params: Path, overrides: list[str] | None):
    from varstudent.cli import _load as load

    return load(params, overrides)


class StageFailed(VarstudentError):
    """A pipeline task failed; the message is the stage's own error line."""


PIPELINES = ("training", "tuning")


def _builder(pipeline: str):
    """The function that builds the named pipeline."""
    if pipeline == "training":
        from pipelines.training import build_pipeline

        return build_pipeline
    if pipeline == "tuning":
        from pipelines.tuning import build_tuning_pipeline

        return build_tuning_pipeline
    raise ConfigError(f"--pipeline {pipeline!r}: expected one of {', '.join(PIPELINES)}")


def default_package(out: Path, pipeline: str = "training") -> Path:
    return out / "kfp" / f"varstudent-{pipeline}.yaml"


@app.command("compile")
def compile_command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt,
                    output: Path | None = typer.Option(None, "--output", help="IR YAML to write "
                                                       "(default OUT/kfp/varstudent-training.yaml)"),
                    out: Path = OutOpt, pipeline: str = PipelineOpt) -> None:
    """Write the pipeline's IR YAML; every stage setting is a parameter defaulting to params.yaml."""
    from pipelines.training import compile_pipeline

    if output is not None and output.suffix not in (".yaml", ".yml"):  # kfp's compiler raises a bare ValueError
        raise ConfigError(f"--output {output}: the pipeline's IR is YAML; name a .yaml file")
    path = compile_pipeline(_load(params, set_), output or default_package(out, pipeline), _builder(pipeline))
    typer.echo(f"compiled {path}")


class _TaskLog(io.TextIOBase):
    """kfp.local prints each task's output here: keep its `varstudent: error:` lines, and pass through the
    stage's log lines (all lines when verbose; the executor's JSON dumps otherwise drown them)."""

    def __init__(self, target, verbose: bool) -> None:
        self.target, self.verbose, self.error_lines, self._partial = target, verbose, [], ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            plain = line.strip()  # kfp.local indents a task's output
            if plain.startswith("varstudent: error:"):
                self.error_lines.append(plain)
            # the executor's start/finish lines, but not the hundreds it logs while importing a task's
            # modules (great_expectations registers closures: "Skipping registering function ... closure")
            executor = plain.startswith("[KFP Executor") and "Skipping registering" not in plain
            if self.verbose or plain.startswith("varstudent:") or executor:
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.target.flush()


def local_study_storage(params, root: Path):
    """A local tuning run's workers share a sqlite file in the pipeline root when tune.storage is `auto`."""
    import dataclasses

    if params.tune.storage != "auto":
        return params
    url = f"sqlite:///{root.resolve() / ('study-' + re.sub(r'[^A-Za-z0-9_.-]', '_', params.tune.study_name))}.db"
    return dataclasses.replace(params, tune=dataclasses.replace(params.tune, storage=url))


@contextlib.contextmanager
def local_run_id() -> Iterator[str]:
    """A run id for a kfp.local run, in $KFP_RUN_ID while it runs: its tasks (subprocesses, which inherit the
    environment) tag their MLflow runs with it as a cluster's tasks do with the pod's run id."""
    import os
    import uuid

    from varstudent.tracking import KFP_RUN_ID_ENV

    run_id, before = f"local-{uuid.uuid4()}", os.environ.get(KFP_RUN_ID_ENV)
    os.environ[KFP_RUN_ID_ENV] = run_id
    try:
        yield run_id
    finally:
        if before is None:
            os.environ.pop(KFP_RUN_ID_ENV, None)
        else:
            os.environ[KFP_RUN_ID_ENV] = before


def run_local(params, root: Path, verbose: bool = False, pipeline_name: str = "training") -> Path:
    """Run the whole DAG through kfp.local in this Python environment (offline; nothing installed) and
    return the run's folder, ROOT/<run>/, which holds <task>/<output name> for every task."""
    from kfp import local

    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    if pipeline_name == "tuning":
        params = local_study_storage(params, root)
    pipeline = _builder(pipeline_name)(params)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    tee = _TaskLog(sys.stdout, verbose)
    with warnings.catch_warnings(), contextlib.redirect_stdout(tee), local_run_id() as run_id:
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # it is our Python image
        try:
            result = pipeline()
        except RuntimeError as exc:
            if tee.error_lines:
                raise StageFailed(tee.error_lines[-1].removeprefix("varstudent: error: ")) from None
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0])  # kfp.local colours its messages
            raise StageFailed(f"the local pipeline run failed: {plain}") from None
    if params.tracking.enabled:
        typer.echo(f"KFP run id (MLflow tag varstudent.kfp_run_id): {run_id}")
    return Path(result.output.path).parents[1]  # the pipeline's output is ROOT/<run>/evaluate/metrics


def publish(run_dir: Path, out: Path) -> dict[str, Path]:
    """Copy each stage's output folder of a local run to OUT/<stage>/, the layout `varstudent run`, dvc.yaml
    and the README use (a stage's previous folder there is replaced)."""
    import shutil

    from components import STAGES

    published = {}
    for spec in STAGES:
        if not (run_dir / spec.name).is_dir():  # a stage the pipeline left out (register without tracking)
            continue
        target = out / spec.name
        if target.exists():
            shutil.rmtree(target)
        published[spec.name] = Path(shutil.copytree(run_dir / spec.name / spec.name, target))
    return published


@app.command("run")
def run_command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt,
                local_: bool = typer.Option(False, "--local", help="run through kfp.local in this environment"),
                root: Path | None = typer.Option(None, "--root", help="local pipeline root "
                                                  "(default kfp.pipeline_root)"),
                verbose: bool = typer.Option(False, "--verbose", help="show every line the tasks print"),
                out: Path = typer.Option(Path("artifacts"), "--out", help="each stage's outputs are copied to "
                                         "OUT/<stage>/ as `varstudent run` writes them"),
                pipeline: str = PipelineOpt) -> None:
    """Run the pipeline locally (--local) and print the evaluate summary."""
    if not local_:
        raise ConfigError("`pipeline run` needs --local; use `varstudent pipeline submit --host URL` for a cluster")
    from varstudent.artifacts import read_json
    from varstudent.cli import summary_table

    settings = _load(params, set_)
    started = time.perf_counter()
    run_dir = run_local(settings, root or Path(settings.kfp.pipeline_root), verbose, pipeline)
    folders = publish(run_dir, out)
    typer.echo(summary_table(read_json(folders["evaluate"] / "metrics.json", "evaluate metrics")))
    if pipeline == "tuning":
        typer.echo(f"the chosen trial's settings: {run_dir / 'tune-pick' / 'chosen' / 'best_params.yaml'}")
    typer.echo(f"total {time.perf_counter() - started:.0f} s; report: {folders['evaluate'] / 'report.md'}; "
               f"the run's artifacts: {run_dir}")


def _client(host: str):
    import kfp

    try:
        return kfp.Client(host=host)
    except Exception as exc:  # kfp raises many kinds for a bad endpoint; the user needs the URL
        raise ServiceError(f"cannot reach the KFP endpoint {host}: {str(exc).splitlines()[0][:200]}") from None


def _package(params, out: Path, pipeline: str = "training") -> Path:
    from pipelines.training import compile_pipeline

    return compile_pipeline(params, default_package(out, pipeline), _builder(pipeline))


@app.command("submit")
def submit_command(host: str = HostOpt, params: Path = ParamsOpt, set_: list[str] | None = SetOpt,
                   experiment: str = ExperimentOpt,
                   run_name: str | None = typer.Option(None, "--run-name", help="default varstudent-<UTC time>"),
                   service_account: str = AccountOpt, out: Path = OutOpt, pipeline: str = PipelineOpt) -> None:
    """Compile and start one run on a Kubeflow Pipelines cluster."""
    settings = _load(params, set_)
    package = _package(settings, out, pipeline)
    name = run_name or time.strftime("varstudent-%Y%m%d-%H%M%S", time.gmtime())
    try:
        result = _client(host).create_run_from_pipeline_package(
            str(package), arguments={}, run_name=name, experiment_name=experiment, service_account=service_account)
    except VarstudentError:
        raise
    except Exception as exc:
        raise ServiceError(f"KFP at {host} refused the run: {str(exc).splitlines()[0][:200]}") from None
    typer.echo(f"submitted run {name} ({result.run_id}) to {host}, experiment {experiment}")


@app.command("schedule")
def schedule_command(host: str = HostOpt,
                     cron: str = typer.Option(..., "--cron", help="6-field cron (seconds first), e.g. '0 0 3 * * 1' "
                                              "= Mondays 03:00"),
                     params: Path = ParamsOpt, set_: list[str] | None = SetOpt, experiment: str = ExperimentOpt,
                     job_name: str = typer.Option("varstudent-retraining", "--job-name"),
                     service_account: str = AccountOpt, out: Path = OutOpt, pipeline: str = PipelineOpt) -> None:
    """A recurring run for scheduled retraining: at most one at a time, no catch-up of missed runs."""
    if len(cron.split()) != 6:
        raise ConfigError(f"--cron {cron!r}: KFP expects 6 fields (second minute hour day month weekday)")
    settings = _load(params, set_)
    package = _package(settings, out, pipeline)
    client = _client(host)
    try:
        experiment_id = client.create_experiment(name=experiment).experiment_id
        job = client.create_recurring_run(experiment_id=experiment_id, job_name=job_name, cron_expression=cron,
                                          max_concurrency=1, no_catchup=True, pipeline_package_path=str(package),
                                          service_account=service_account)
    except Exception as exc:
        raise ServiceError(f"KFP at {host} refused the recurring run: {str(exc).splitlines()[0][:200]}") from None
    typer.echo(f"scheduled {job_name} ({job.recurring_run_id}) on {host}: cron '{cron}', max concurrency 1, "
               "no catch-up")
