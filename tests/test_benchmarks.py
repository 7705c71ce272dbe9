"""Benchmark plumbing: students trained on another machine (gpu_students.py) come back into reproduce.py's
table only when they were trained with the row's own settings and teacher."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.dataset=digits", "--set", "teacher.epochs=1", "--set", "evaluate.latency_repeats=2"]


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _gpu_students(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_students.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_student_trained_elsewhere_is_reused_only_with_its_own_settings(tmp_path: Path, capsys) -> None:
    reproduce, work = _reproduce(), tmp_path / "work"
    reproduce.main(["mnist-mlp", "--out", str(work), "--only", *DIGITS])  # data + teacher, no rows
    _gpu_students("pack", str(work), "--out", str(tmp_path / "packed"))
    run = _gpu_students("run", str(tmp_path / "packed"), "--out", str(tmp_path / "back"), "--row", "vs_bsr:",
                        "--set", "distill.epochs=2", "--poll", "0.5")
    assert "| vs_bsr | done | 2/2 |" in run.stdout  # the summary the GPU run returns
    _gpu_students("unpack", str(tmp_path / "back"), "--into", str(work))
    student = work / "vs_bsr" / "distill" / "student.safetensors"
    trained_at = student.stat().st_mtime_ns
    capsys.readouterr()

    reproduce.main(["mnist-mlp", "--out", str(work), "--only", "vs_bsr", "--reuse-teacher", "--reuse-students",
                    *DIGITS, "--set", "distill.epochs=2"])
    assert "vs_bsr: student reused from" in capsys.readouterr().out
    assert student.stat().st_mtime_ns == trained_at  # taken as it came back, not retrained
    row = next(r for r in json.loads((work / "results.json").read_text())["rows"] if r["method"] == "vs_bsr")
    assert row["epochs"] == 2 and 0 < row["nonzero"] <= row["weights"]

    with pytest.raises(SystemExit, match=r"trained with other settings \(distill\)"):
        reproduce.main(["mnist-mlp", "--out", str(work), "--only", "vs_bsr", "--reuse-teacher", "--reuse-students",
                        *DIGITS, "--set", "distill.epochs=3"])
