"""`varstudent register` and `varstudent lineage`: the MLflow registry commands (merged into the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer()


@app.command("register")
def register_command(params: Path = typer.Option(None, "--params",
                                                 help="params file [default: ./params.yaml if there is one]"),
                     set_: list[str] | None = typer.Option(None, "--set", help="override one setting (repeatable)"),
                     out: Path = typer.Option(Path("artifacts"), "--out", help="artifacts root")) -> None:
    """Register the compact student; `champion` only if it passes the gate in register.*, else `challenger`."""
    from varstudent.cli import _call, _load
    from varstudent.registry import require_tracking

    settings = _load(params, set_)
    require_tracking(settings)  # before the artifacts folder is locked (and so created)
    decision = _call("register", settings, out)
    typer.echo(f"{decision['model']} version {decision['version']}: {decision['alias']}"
               + (f" ({decision['failed_rule']})" if decision.get("failed_rule") else ""))


@app.command("lineage")
def lineage_command(model: str = typer.Argument(..., metavar="MODEL@ALIAS",
                                                help="e.g. varstudent-student@champion or NAME/VERSION"),
                    params: Path = typer.Option(None, "--params", help="params file (tracking.uri) "
                                                "[default: ./params.yaml if there is one]"),
                    set_: list[str] | None = typer.Option(None, "--set", help="override one setting"),
                    json_: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Where a registered version came from: dataset digest, git commit, params, teacher version, stage runs."""
    from varstudent.cli import _load
    from varstudent.registry import lineage

    info = lineage(_load(params, set_), model)
    if json_:
        typer.echo(json.dumps(info, indent=1))
        return
    lines = [f"{info['model']} version {info['version']} (aliases: {', '.join(info['aliases']) or 'none'})"]
    for key in ("dataset_digest", "git_commit", "params_digest", "kfp_run_id", "teacher_version", "accuracy",
                "compression", "bytes", "gate"):
        if info.get(key) is not None:
            lines.append(f"  {key:<16}{info[key]}")
    lines.append("  runs:")
    lines += [f"    {stage:<10}{run['run_id']}  {run['status']}" for stage, run in info["runs"].items()]
    lines.append("  params:")
    lines += [f"    {key} = {value}" for key, value in info["params"].items()]
    typer.echo("\n".join(lines))
