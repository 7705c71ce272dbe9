"""`varstudent`: one command per stage, plus `run` for all five in order.

Every command takes --params FILE, repeatable --set section.key=value, and --out DIR (the artifacts
root; each stage reads and writes its own sub-folder there). Errors the user can fix print one line and
exit 1; no traceback.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from varstudent.cli_data import data_app
from varstudent.cli_tune import tune_app
from varstudent.errors import VarstudentError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a teacher network into a sparse variational student, prune and evaluate it.")

app.add_typer(data_app, name="data")
app.add_typer(tune_app, name="tune")

STAGES = ("prepare", "teacher", "distill", "prune", "evaluate")

ParamsOpt = typer.Option(None, "--params", help="params file (every setting lives here) [default: ./params.yaml "
                         "if there is one, else the built-in defaults]")
SetOpt = typer.Option(None, "--set", help="override one setting, e.g. --set distill.epochs=5 (repeatable)")
OutOpt = typer.Option(Path("artifacts"), "--out", help="artifacts root; each stage uses OUT/<stage>/")


def stage_dirs(out: Path) -> dict[str, Path]:
    """The one place the artifact layout is defined: OUT/<stage>/."""
    return {name: out / name for name in (*STAGES, "register")}


def _load(params_file: Path | None, overrides: list[str] | None):
    """The settings: `--params FILE` (which must exist), else ./params.yaml where there is one, else the
    built-in defaults (a fresh folder runs the documented default job)."""
    from varstudent.config import load_params

    if params_file is None:
        params_file = Path("params.yaml") if Path("params.yaml").is_file() else None
    return load_params(params_file, overrides or [])


def _call(name: str, params, out: Path, tracker=None) -> dict[str, Any]:
    return call_stage(name, params, stage_dirs(out), tracker, out)


def call_stage(name: str, params, d: dict[str, Path], tracker=None, out: Path | None = None) -> dict[str, Any]:
    """Run one stage (tracked) with its folders given by name. With `out` (the CLI's artifacts root) it holds
    OUT's lock, stages its outputs and checkpoints into OUT/checkpoints/; a KFP component passes its own
    artifact folders and no `out` (each task's folders are its own; KFP retries rerun a task from scratch)."""
    import contextlib

    from varstudent import stages
    from varstudent.outputs import out_lock, staged

    ckpt = out / "checkpoints" if out is not None else None
    # each stage writes into a staging folder (`to`) that replaces OUT/<stage>/ only once it succeeded
    calls: dict[str, Callable[[Path], dict[str, Any]]] = {
        "prepare": lambda to: stages.prepare(params, to, report_dir=d["prepare"]),
        "teacher": lambda to: stages.teacher(params, d["prepare"], to, ckpt / "teacher" if ckpt else None),
        "distill": lambda to: stages.distill(params, d["prepare"], d["teacher"], to,
                                             ckpt / "distill" if ckpt else None),
        "prune": lambda to: stages.prune(params, d["prepare"], d["distill"], to),
        "evaluate": lambda to: stages.evaluate(params, d["prepare"], d["teacher"], d["distill"], d["prune"], to),
        "register": lambda to: stages.register(params, d["prepare"], d["teacher"], d["distill"], d["prune"],
                                               d["evaluate"], to),
    }
    if tracker is None:
        from varstudent.tracking import Tracker

        tracker = Tracker(params)
    started = time.perf_counter()
    with out_lock(out) if out else contextlib.nullcontext(), tracker.stage(name, d) as logged:
        with staged(d[name]) if out else contextlib.nullcontext(d[name]) as to:
            metrics = calls[name](to)
        logged.update(metrics)
    logging.getLogger("varstudent").info("%s done in %.1f s -> %s", name, time.perf_counter() - started, d[name])
    return metrics


def _stage_command(name: str, doc: str) -> None:
    def command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt, out: Path = OutOpt) -> None:
        metrics = _call(name, _load(params, set_), out)
        if name == "evaluate":
            typer.echo(summary_table(metrics))

    command.__doc__ = doc
    app.command(name)(command)


_stage_command("prepare", "Obtain and decode the dataset once; write OUT/prepare/.")
_stage_command("teacher", "Train the dense teacher; write OUT/teacher/.")
_stage_command("distill", "Train the sparse variational student from the teacher; write OUT/distill/.")
_stage_command("prune", "Drop weights with log alpha >= threshold and dead units; write OUT/prune/.")
_stage_command("evaluate", "Accuracy, sparsity, compression, bytes, CPU throughput; write OUT/evaluate/.")


@app.command()
def run(params: Path = ParamsOpt, set_: list[str] | None = SetOpt, out: Path = OutOpt) -> None:
    """Run all five stages in order (then `register` when tracking is on) and print the summary table."""
    from varstudent.tracking import Tracker

    settings = _load(params, set_)
    tracker = Tracker(settings)
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    from varstudent.outputs import out_lock

    # one lock for all the stages: no other run mixes its outputs into this one's
    from varstudent.stages import preflight

    preflight(settings)  # a settings mistake fails now, not after the teacher has trained and replaced its folder
    with out_lock(out), tracker.pipeline():
        for name in STAGES:
            metrics = _call(name, settings, out, tracker)
            if name == "prepare" and settings.data.dataset.startswith("dir:"):  # its input shape is known now
                from varstudent.artifacts import read_json

                manifest = read_json(stage_dirs(out)["prepare"] / "manifest.json", "prepared-data manifest")
                preflight(settings, tuple(manifest["input_shape"]), manifest["num_classes"])
        decision = _call("register", settings, out, tracker) if settings.tracking.enabled else None
    typer.echo(summary_table(metrics))
    if decision:
        typer.echo(f"registered {decision['model']} version {decision['version']} as {decision['alias']}"
                   + (f" ({decision['failed_rule']})" if decision.get("failed_rule") else "")
                   + f"; MLflow took {tracker.seconds:.1f} s")
    typer.echo(f"total {time.perf_counter() - started:.0f} s; report: {stage_dirs(out)['evaluate'] / 'report.md'}")


@app.command("predict")
def predict_command(
        model: str = typer.Argument(..., metavar="MODEL", help="an export folder (e.g. artifacts/prune) or file"),
        inputs: list[Path] = typer.Option(..., "--input", help=".npy batch or image file (repeatable)"),
        format_: str | None = typer.Option(None, "--format", help="export format in the folder (default: the "
                                           "first of export.formats at prune time)"),
        json_: bool = typer.Option(False, "--json", help="print JSON instead of index<TAB>class<TAB>probability"),
        threads: int = typer.Option(0, "--threads", min=0, max=1024, help="CPU threads; 0 = torch's default")) -> None:
    """Classify inputs with an exported student: one line per sample, index, class and probability."""
    import json

    import torch

    from varstudent.errors import ArtifactError
    from varstudent.export import load_export
    from varstudent.predict import predict, read_inputs

    if "://" in model or model.startswith(("models:/", "runs:/")):
        raise ArtifactError(f"{model}: MLflow model URIs are not supported yet; pass an export folder or file")
    if threads:
        torch.set_num_threads(threads)
    net = load_export(Path(model), format_, threads)
    rows = predict(net, read_inputs(inputs, tuple(net.spec["input_shape"])))
    if json_:
        typer.echo(json.dumps({"model": model, "format": net.export_format, "predictions": rows}, indent=1))
    else:
        typer.echo("\n".join(f"{r['index']}\t{r['class']}\t{r['probability']:.4f}" for r in rows))


from varstudent.cli_mlflow import app as _mlflow_commands  # noqa: E402  (register, lineage)

app.add_typer(_mlflow_commands)


@app.command("params")
def show_params(params: Path = ParamsOpt, set_: list[str] | None = SetOpt) -> None:
    """Validate the params file and print the effective settings."""
    typer.echo(_load(params, set_).to_yaml().rstrip())


def summary_table(m: dict[str, Any]) -> str:
    rows = [
        ("teacher", m["teacher_accuracy"], m["teacher_weights"], m["teacher_weights"], m["teacher_bytes"]),
        ("student (masked)", m["student_accuracy"], m["student_weights"], m["student_nonzero_weights"], None),
        ("compact student", m["compact_accuracy"], m["compact_weights"], m["nonzero_weights"], m["compact_bytes"]),
    ]
    lines = [f"{'model':<18}{'test acc':>10}{'weights':>12}{'nonzero':>11}{'bytes':>12}"]
    for name, acc, weights, nonzero, size in rows:
        lines.append(f"{name:<18}{100 * acc:>9.2f}%{weights:>12,}{nonzero:>11,}"
                     f"{(f'{size:,}' if size else '-'):>12}")
    lines.append(f"compression: {m['compression_vs_student']:.1f}x vs dense student, "
                 f"{m['compression_vs_teacher']:.1f}x vs teacher; compact is "
                 f"{m['compact_speedup_vs_teacher_b256']:.1f}x the teacher's throughput at batch 256 "
                 f"({m['threads']} threads)")
    return "\n".join(lines)


from varstudent.cli_pipeline import app as pipeline_app  # noqa: E402

app.add_typer(pipeline_app, name="pipeline")


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Click's usage errors, and typer's own copy of them: typer >= 0.29 vendors click as typer._click, whose
    exceptions are not click's (catching click's alone let every usage error end in a traceback)."""
    import click

    errors: list[type[BaseException]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException

        errors.append(VendoredClickException)
    except ImportError:  # a typer that uses click itself
        pass
    return tuple(errors)


def _aborts() -> tuple[type[BaseException], ...]:
    import click

    aborts: list[type[BaseException]] = [click.exceptions.Abort, KeyboardInterrupt]
    if hasattr(typer, "Abort") and typer.Abort not in aborts:
        aborts.append(typer.Abort)
    return tuple(aborts)


INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C (128 + SIGINT)


def main() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("varstudent: %(message)s"))
    logger = logging.getLogger("varstudent")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        # standalone_mode=False: errors reach the handlers below; typer turns Ctrl-C into Exit(130) and a
        # typer.Exit into its code, both *returned* here - dropping the value made an interrupted run exit 0
        code = app(standalone_mode=False)
    except VarstudentError as exc:
        print(f"varstudent: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except _usage_errors() as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except _aborts():
        print("varstudent: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except OSError as exc:  # disk full, permission denied: the user can act on these
        print(f"varstudent: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == INTERRUPTED:
            print("varstudent: interrupted", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
