"""What runs inside a component's task: settings -> Params, artifacts -> stage folders, stage -> artifacts.

Needs no kfp import: artifacts are used through `.path`, `.metadata` and `.log_metric` only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any


def run_stage(name: str, settings: str, inputs: dict[str, Any], output: Any, metrics: Any,
              report: Any = None) -> dict[str, Any]:
    """Run stage `name` on the input artifacts' folders, writing into the output artifact's folder.

    A user-fixable error prints one `varstudent: error: <stage>: ...` line (what `pipeline run --local`
    and the KFP UI's log show) and exits 1, which fails the task and the run.
    """
    from varstudent.cli import call_stage
    from varstudent.errors import VarstudentError
    from varstudent.pipeline_params import params_from_settings

    logging.getLogger("varstudent").setLevel(logging.INFO)
    if not logging.getLogger().handlers:  # KFP's executor usually has set up logging already
        logging.basicConfig(stream=sys.stdout, format="varstudent: %(message)s")
    dirs = {upstream: Path(artifact.path) for upstream, artifact in inputs.items()}
    dirs[name] = Path(output.path)
    try:
        values = call_stage(name, params_from_settings(settings), dirs)
    except VarstudentError as exc:
        print(f"varstudent: error: {name}: {exc}", flush=True)
        raise SystemExit(1) from None
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
        elif isinstance(value, str):  # e.g. stop_reason, dataset: kept as metadata, not a metric
            output.metadata[key] = value
    if report is not None:
        Path(report.path).write_text((dirs[name] / "report.md").read_text())
    return values
