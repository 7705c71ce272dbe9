"""Data-parallel teacher: 2 CPU processes under torchrun (gloo) follow the single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from varstudent import stages
from varstudent.artifacts import load_model
from varstudent.config import load_params
from varstudent.data import write_prepared

SETTINGS = ["teacher.arch=mlp-64-32", "teacher.epochs=3", "teacher.batch_size=100", "tracking.enabled=false",
            "runtime.device=cpu"]


@pytest.fixture(scope="module")
def even_digits(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,400 of the digits: every batch of 100 splits into two equal halves, so DDP's averaged gradient is
    the whole batch's gradient and only the floating-point summation order differs."""
    from safetensors.numpy import load_file

    from varstudent.data.prepared import _KEYS, DATA_FILE

    x_train, y_train, x_test, y_test = (load_file(digits_dir / DATA_FILE)[key] for key in _KEYS)
    out = tmp_path_factory.mktemp("even") / "prepare"
    write_prepared(out, "digits", x_train[:1400], y_train[:1400], x_test, y_test, list(range(10)))
    return out


@pytest.mark.slow
def test_two_processes_match_one(even_digits: Path, tmp_path: Path) -> None:
    single = stages.teacher(load_params(None, SETTINGS), even_digits, tmp_path / "one")
    double = stages.teacher(load_params(None, [*SETTINGS, "teacher.nproc=2"]), even_digits, tmp_path / "two")
    one, two = load_model(tmp_path / "one", "teacher"), load_model(tmp_path / "two", "teacher")
    # tolerance: float32 sums in another order over 3 epochs of Adam; measured max difference 1e-7
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=name)
    assert abs(double["teacher_accuracy"] - single["teacher_accuracy"]) <= 1 / 360  # at most one test sample
    h1 = json.loads((tmp_path / "one/history.json").read_text())
    h2 = json.loads((tmp_path / "two/history.json").read_text())
    for r1, r2 in zip(h1, h2, strict=True):  # epoch statistics are summed over both processes
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["train_accuracy"] == pytest.approx(r1["train_accuracy"], abs=1 / 1400)
    assert double["epochs_run"] == single["epochs_run"] == 3
    assert (single["train_processes"], double["train_processes"]) == (1, 2)  # the group really had two


def test_a_worker_error_is_the_stage_error(even_digits: Path, tmp_path: Path) -> None:
    from varstudent.errors import TrainingError

    params = load_params(None, [*SETTINGS, "teacher.nproc=2"])
    with pytest.raises(TrainingError, match="teacher on 2 processes: .*no prepared data"):
        stages.teacher(params, tmp_path / "no-data", tmp_path / "t")
    assert not (tmp_path / "t" / "metrics.json").exists()
