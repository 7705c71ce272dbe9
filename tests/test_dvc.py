"""dvc.yaml: `dvc repro` runs the five stages through the CLI, and a second repro skips them all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent))


def test_dvc_stages_are_the_cli_stages_with_their_params_sections() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "teacher", "distill", "prune", "evaluate"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"varstudent {name} --out artifacts"
        assert stage["params"] and stage["deps"]
        assert any(f"artifacts/{name}/metrics.json" in m for m in stage["metrics"])
    assert "distill" in stages["distill"]["params"]


@pytest.mark.slow
@pytest.mark.skipif(DVC is None, reason="dvc is not installed (pip install -e '.[dvc]')")
def test_dvc_repro_runs_the_pipeline_and_then_skips_it(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files + ["dvc.yaml", "params.yaml", ".dvc/config"]:
        if (REPO / rel).is_file() and not rel.startswith("tests/"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["dataset"] = "digits"
    params["teacher"].update(arch="mlp-200-200", epochs=2)
    params["student"]["arch"] = "mlp-100-50"
    params["distill"]["epochs"] = 2
    params["evaluate"]["latency_repeats"] = 2
    params["tracking"]["enabled"] = False
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=work, env=env, check=True)
    first = subprocess.run([DVC, "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (work / "artifacts/evaluate/metrics.json").is_file()
    second = subprocess.run([DVC, "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0
    for name in ("prepare", "teacher", "distill", "prune", "evaluate"):
        assert f"Stage '{name}' didn't change, skipping" in second.stdout, second.stdout
