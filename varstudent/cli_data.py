"""`varstudent data ...`: fetch a dataset's raw files, and run the data validation suite on a folder."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="Datasets: fetch raw files; check data with the validation suite `prepare` runs.")

ParamsOpt = typer.Option(None, "--params", help="params file (every setting lives here) [default: ./params.yaml "
                         "if there is one, else the built-in defaults]")
SetOpt = typer.Option(None, "--set", help="override one setting, e.g. --set validate.max_class_ratio=3")


def _settings(params: Path, set_: list[str] | None):
    from varstudent.cli import _load

    return _load(params, set_)


@data_app.command("fetch")
def fetch_command(params: Path = ParamsOpt, set_: list[str] | None = SetOpt) -> None:
    """Download / copy the raw files of data.dataset into data.raw_dir (sha256-pinned); DVC's `fetch` stage."""
    from varstudent import stages

    settings = _settings(params, set_)
    stages.fetch(settings, Path(settings.data.raw_dir))


@data_app.command("check")
def check_command(
        path: Path = typer.Argument(..., help="a prepared folder (with manifest.json) or a folder of IDX files "
                                    "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
        report: Path | None = typer.Option(None, "--report", help="also write the HTML report here"),
        params: Path = ParamsOpt, set_: list[str] | None = SetOpt) -> None:
    """Run the data validation suite on PATH; exit 1 listing each failed expectation."""
    from varstudent.data.prepare import check_path
    from varstudent.errors import DataError

    result = check_path(path, _settings(params, set_).validate, report)
    if not result.success:
        raise DataError(result.message())
    counts = ", ".join(f"{name} {n:,}" for name, n in result.counts.items())
    typer.echo(f"passed: {len(result.checks)} expectations on {result.dataset} ({counts}) in {result.seconds:.1f} s"
               + (f"; report {report}" if report else ""))
