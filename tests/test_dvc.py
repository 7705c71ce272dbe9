"""dvc.yaml: `dvc repro` runs the five stages through the CLI, and a second repro skips them all."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO

DVC = shutil.which("dvc", path=str(Path(sys.executable).parent))


def test_dvc_stages_are_the_cli_stages_with_their_params_sections() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["fetch", "prepare", "teacher", "distill", "prune", "evaluate"]
    fetch = stages.pop("fetch")
    assert fetch["cmd"] == "varstudent data fetch" and fetch["outs"] == [{"data/raw": {"persist": True}}]
    assert "data/raw" in stages["prepare"]["deps"] and "validate" in stages["prepare"]["params"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"varstudent {name} --out artifacts"
        assert stage["params"] and stage["deps"]
        assert any(f"artifacts/{name}/metrics.json" in m for m in stage["metrics"])
    assert "distill" in stages["distill"]["params"]


def _dvc_repo(tmp_path: Path, dataset: str = "digits") -> tuple[Path, dict[str, str]]:
    """A git repo in tmp_path with the project's tracked files and a small, fast params.yaml."""
    work = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files + ["dvc.yaml", "params.yaml", ".dvc/config"]:
        if (REPO / rel).is_file() and not rel.startswith("tests/"):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["dataset"] = dataset
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
    return work, env


def _dvc(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DVC, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(DVC is None, reason="dvc is not installed (pip install -e '.[dvc]')")
def test_dvc_repro_runs_the_pipeline_and_then_skips_it(tmp_path: Path) -> None:
    work, env = _dvc_repo(tmp_path)
    first = _dvc(work, env, "repro")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert (work / "artifacts/evaluate/metrics.json").is_file()
    second = _dvc(work, env, "repro")
    assert second.returncode == 0
    for name in ("fetch", "prepare", "teacher", "distill", "prune", "evaluate"):
        assert f"Stage '{name}' didn't change, skipping" in second.stdout, second.stdout


@pytest.mark.slow
@pytest.mark.skipif(DVC is None, reason="dvc is not installed (pip install -e '.[dvc]')")
def test_dvc_prepare_is_skipped_when_unchanged_and_bad_data_fails_it(tmp_path: Path) -> None:
    # Guards: raw and prepared data are DVC outputs with content hashes; an unchanged prepare is skipped;
    # data that fails the validation suite fails `dvc repro` with the expectation's description and leaves
    # the last good outputs (and their dvc.lock entry) as they were.
    work, env = _dvc_repo(tmp_path)
    first = _dvc(work, env, "repro", "prepare")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert lock["fetch"]["outs"][0]["path"] == "data/raw" and lock["fetch"]["outs"][0]["md5"].endswith(".dir")
    assert {o["path"] for o in lock["prepare"]["outs"]} >= {"artifacts/prepare/data.safetensors",
                                                             "artifacts/prepare/validation.html"}
    second = _dvc(work, env, "repro", "prepare")
    assert "Stage 'prepare' didn't change, skipping" in second.stdout, second.stdout
    good_data = (work / "artifacts/prepare/data.safetensors").read_bytes()
    good_lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]["prepare"]
    bad = work / "bad-idx"  # a user's folder whose test split repeats a training image
    bad.mkdir()
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (40, 6, 6), np.uint8), rng.integers(0, 256, (20, 6, 6), np.uint8)
    x_test[3] = x_train[3]
    for name, arr in (("train-images-idx3-ubyte", x_train), ("t10k-images-idx3-ubyte", x_test),
                      ("train-labels-idx1-ubyte", np.arange(40) % 10), ("t10k-labels-idx1-ubyte", np.arange(20) % 10)):
        arr = np.asarray(arr, np.uint8)
        (bad / name).write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["dataset"] = f"dir:{bad}"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = _dvc(work, env, "repro", "prepare")
    assert third.returncode != 0
    assert "no image is in both train and test" in third.stdout + third.stderr
    assert (work / "artifacts/prepare/data.safetensors").read_bytes() == good_data
    assert yaml.safe_load((work / "dvc.lock").read_text())["stages"]["prepare"] == good_lock
