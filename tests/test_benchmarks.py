"""Benchmark plumbing: students trained on another machine (gpu_students.py) come back into reproduce.py's
table only when they were trained with the row's own settings and teacher."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--set", "data.dataset=digits", "--set", "teacher.epochs=1", "--set", "evaluate.latency_repeats=2"]


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # reproduce's dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _reproduce():
    return _benchmark("reproduce")


def _gpu_students(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_students.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_a_student_trained_elsewhere_is_reused_only_with_its_own_settings(tmp_path: Path, capsys) -> None:
    """The whole round trip of a lease: data packed here, teacher and student trained there, the table here."""
    reproduce, work = _reproduce(), tmp_path / "work"
    _gpu_students("pack", str(work), "--out", str(tmp_path / "packed"), "--experiment", "mnist-mlp", *DIGITS)
    assert not (tmp_path / "packed" / "teacher").exists()  # the other machine trains it
    run = _gpu_students("run", str(tmp_path / "packed"), "--out", str(tmp_path / "back"), "--experiment",
                        "mnist-mlp", "--method", "vs_bsr", "--set", "distill.epochs=2", "--poll", "0.5")
    assert "TEACHER" in run.stdout and "| vs_bsr | done | 2/2 |" in run.stdout  # the summary it returns
    _gpu_students("unpack", str(tmp_path / "back"), "--into", str(work))
    assert json.loads((work / "teacher" / "metrics.json").read_text())["epochs_run"] == 1
    student, teacher = work / "vs_bsr" / "distill" / "student.safetensors", work / "teacher" / "teacher.safetensors"
    trained_at, teacher_at = student.stat().st_mtime_ns, teacher.stat().st_mtime_ns
    capsys.readouterr()

    reproduce.main(["mnist-mlp", "--out", str(work), "--only", "vs_bsr", "--reuse-teacher", "--reuse-students",
                    *DIGITS, "--set", "distill.epochs=2"])
    assert "vs_bsr: student reused from" in capsys.readouterr().out
    assert teacher.stat().st_mtime_ns == teacher_at  # the teacher trained there, not retrained here
    assert student.stat().st_mtime_ns == trained_at  # taken as it came back, not retrained
    row = next(r for r in json.loads((work / "results.json").read_text())["rows"] if r["method"] == "vs_bsr")
    assert row["epochs"] == 2 and 0 < row["nonzero"] <= row["weights"]

    with pytest.raises(SystemExit, match=r"trained with other settings \(distill\)"):
        reproduce.main(["mnist-mlp", "--out", str(work), "--only", "vs_bsr", "--reuse-teacher", "--reuse-students",
                        *DIGITS, "--set", "distill.epochs=3"])


def test_a_row_is_stopped_only_to_let_a_row_before_it_finish() -> None:
    gpu_students = _benchmark("gpu_students")
    stop = gpu_students.row_to_stop
    assert stop(["vs_bsr", "sparse_vd", "vs"], ["vs_bsr"]) == "vs"  # frees the card for the first row
    assert stop(["vs_bsr", "sparse_vd"], ["sparse_vd"]) is None  # the late row is the last: it runs on
    assert stop(["vs_bsr", "sparse_vd"], ["vs_bsr", "sparse_vd"]) == "sparse_vd"
    assert stop(["vs_bsr"], ["vs_bsr"]) is None and stop(["a", "b"], []) is None


def _codebook_parity():
    return _benchmark("codebook_parity")


def test_codebook_quantization_shares_values_and_keeps_zeros(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from tests.test_prune import randomly_sparse
    from varstudent.artifacts import save_model
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.prune import compact

    bench = _codebook_parity()
    values = np.random.default_rng(0).standard_normal(5000)
    centroids, index = bench.codebook(values, 15)
    assert centroids.shape == (15,) and np.all(np.diff(centroids) > 0)
    nearest = np.abs(values[:, None] - centroids[None].astype(np.float64)).argmin(1)
    assert np.mean(index == nearest) > 0.999  # nearest centroid (ties at a midpoint aside)
    grid = np.linspace(values.min(), values.max(), 15)  # Lloyd's starting point: its error only goes down
    grid_error = np.mean((values - grid[np.abs(values[:, None] - grid[None]).argmin(1)]) ** 2)
    assert np.mean((values - centroids[index]) ** 2) < 0.7 * grid_error
    few = np.array([0.5, -1.0, 0.5, 2.0])
    exact, which = bench.codebook(few, 15)  # fewer distinct values than levels: stored exactly
    assert np.array_equal(exact[which], few.astype(np.float32))

    net = build_model(build_spec("mlp-40-20", (1, 8, 8), 10, variational=True))
    randomly_sparse(net, 0.3)
    small = compact(net.eval())
    save_model(small, tmp_path, "compact")
    shared, payload = bench.quantized(tmp_path, 3)
    assert payload > 0
    for before, after in zip(small.blocks, shared.blocks):
        w, q = before.op.weight.detach(), after.op.weight.detach()
        assert torch.equal(w == 0, q == 0)  # zeros stay zero, kept weights stay kept
        assert len(torch.unique(q[q != 0])) <= 7  # 3 bits: code 0 is zero, 7 shared values


def test_epoch_speed_interleaves_rounds_and_reports_ranges(digits_dir: Path, tmp_path: Path) -> None:
    import torch

    from varstudent.artifacts import save_model
    from varstudent.data import load_prepared
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.nn.variational import variational_layers

    data = load_prepared(digits_dir)
    student = build_model(build_spec("mlp-16-8", data.input_shape, data.num_classes, variational=True))
    with torch.no_grad():  # a trained student's state: all but the first 2 inputs of each unit pruned
        variational_layers(student)[0].weight[:, :2] = 0.5
        variational_layers(student)[0].weight[:, 2:] = 0.0
    save_model(student, tmp_path, "student")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "epoch_speed.py"), "--data", str(digits_dir),
                           "--student", "mlp-16-8", "--teacher", "mlp-32-16", "--epochs", "1", "--rounds", "2",
                           "--sparse-from", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert len(rows) == 8 and "2 rounds" in done.stdout
    assert rows[0].endswith("| 1.00 [1.00 - 1.00] |")  # the dense student is its own baseline in every round
    assert "BSR overhead:" in done.stdout and "[" in done.stdout.split("BSR overhead:")[1]
    assert "train_clip overhead:" in done.stdout and "kept-weights products:" in done.stdout
    assert "kept share per layer 3.1 %" in done.stdout  # 2 of 64 inputs: the layer the rows start from


def test_kernel_ab_alternates_two_kernel_builds_on_the_same_epochs(digits_dir: Path) -> None:
    import shutil

    if not shutil.which("cc") or os.environ.get("VARSTUDENT_NO_KERNELS") == "1" or not (REPO / ".git").exists():
        pytest.skip("needs a C compiler, the kernels and a git checkout")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kernel_ab.py"), "--base", "HEAD",
                           "--rounds", "1", "--data", str(digits_dir), "--fresh"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 1
    for line in rounds:  # the same epoch from the same state and seed: the same loss with either build
        first, second = (float(v) for v in line.split("losses ")[1].split(" / "))
        assert first == pytest.approx(second, rel=1e-4)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "kernels" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| dense student", "| vdkl.c at HEAD", "| working tree"]
    assert all(float(row.split(" | ")[3].split()[0]) > 0 for row in rows[1:])  # vd_step timed in both
    assert "working tree vs HEAD:" in done.stdout


def test_front_plot_reads_every_row_of_a_folder_and_keeps_the_non_dominated(tmp_path: Path) -> None:
    front_plot = _benchmark("front_plot")
    for row, accuracy, compression in [("svd_a", 0.9, 50.0), ("vs_b", 0.95, 20.0)]:
        metrics = tmp_path / "mnist5k" / row / "evaluate" / "metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_text(json.dumps({"compact_accuracy": accuracy, "compression_vs_student": compression}))
    rows = {r["method"]: r for r in front_plot.rows_of(tmp_path)}
    assert rows.keys() == {"svd_a", "vs_b"}
    assert rows["svd_a"]["x vs student"] == 50.0 and abs(rows["vs_b"]["error %"] - 5.0) < 1e-9
    assert front_plot.pareto([(50, 90), (20, 95), (10, 94), (50, 89)]) == [(20, 95), (50, 90)]
    with pytest.raises(SystemExit, match="no results.json"):
        front_plot.rows_of(tmp_path / "mnist5k" / "svd_a" / "evaluate")


def test_front_plot_compares_at_equal_compression_by_log_interpolation_and_never_extrapolates() -> None:
    front_plot = _benchmark("front_plot")
    front = [(10.0, 96.0), (100.0, 90.0)]
    assert front_plot.front_accuracy_at(front, 10.0) == 96.0
    # 31.6x is half-way in log compression: half-way in accuracy, not the ~24 % of the way a linear axis gives
    assert abs(front_plot.front_accuracy_at(front, 10 ** 1.5) - 93.0) < 1e-9
    assert front_plot.front_accuracy_at(front, 9.9) is None and front_plot.front_accuracy_at(front, 101) is None
    assert front_plot.front_accuracy_at([(50.0, 91.0)], 50.0) == 91.0


def test_bsr_cost_times_the_term_in_interleaved_rounds() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bsr_cost.py"), "--teacher", "mlp-32-16",
                           "--student", "mlp-16-8", "--rounds", "2", "--steps", "3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = re.search(r"without BSR ([\d.]+) ms, with ([\d.]+) ms; the BSR adds (-?[\d.]+) ms \(rounds", done.stdout)
    assert found and float(found[1]) > 0 and float(found[2]) > 0, done.stdout


def test_front_plot_versus_prints_each_rows_margin_at_equal_compression(tmp_path: Path) -> None:
    for row, accuracy, compression in [("svd_a", 0.90, 10.0), ("svd_b", 0.80, 100.0), ("vs_c", 0.90, 10 ** 1.5),
                                       ("vs_d", 0.99, 500.0)]:
        metrics = tmp_path / row / "evaluate" / "metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_text(json.dumps({"compact_accuracy": accuracy, "compression_vs_student": compression}))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "front_plot.py"), str(tmp_path / "f.png"),
                           str(tmp_path), "--family", "SVD=^svd", "--family", "VS=^vs", "--versus", "SVD"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vs_c: 90.00 % at 31.6x; vs the SVD front at 31.6x: +5.00 points (front 85.00 %)" in done.stdout
    assert "vs_d: 99.00 % at 500.0x; vs the SVD front at 500.0x: outside its range" in done.stdout
    assert (tmp_path / "f.png").is_file()


def test_seed_margins_compares_each_seed_with_its_own_front_and_averages(tmp_path: Path) -> None:
    # seed 0: the front runs 90 % at 10x to 80 % at 100x; seed 1: 92 % to 82 %, so the same VS row (90 % at
    # 31.6x) is +5 points on seed 0 and +3 on seed 1; vs_far lies outside seed 1's front
    rows = {"0": [("svd_a", 0.90, 10.0), ("svd_b", 0.80, 100.0), ("vs_c", 0.90, 10 ** 1.5), ("vs_far", 0.80, 90.0)],
            "1": [("svd_a", 0.92, 10.0), ("svd_b", 0.82, 100.0), ("vs_c", 0.90, 10 ** 1.5), ("vs_far", 0.80, 400.0)]}
    for seed, entries in rows.items():
        for row, accuracy, compression in entries:
            metrics = tmp_path / f"s{seed}" / row / "evaluate" / "metrics.json"
            metrics.parent.mkdir(parents=True)
            metrics.write_text(json.dumps({"compact_accuracy": accuracy, "compression_vs_student": compression}))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "seed_margins.py"), str(tmp_path / "m.png"),
                           "--seed", f"0={tmp_path / 's0'}", "--seed", f"1={tmp_path / 's1'}", "--reference", "^svd",
                           "--rows", "^vs", "--target", "4", "--json", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["margins"]["0"]["vs_c"] == pytest.approx(5.0) and result["margins"]["1"]["vs_c"] == pytest.approx(3.0)
    assert result["margins"]["1"]["vs_far"] is None
    assert result["best"] == {"0": pytest.approx(5.0), "1": pytest.approx(3.0)}
    # averaged: front 91 % at 10x .. 81 % at 100x; vs_c 90 % at 31.6x -> +4
    assert result["averaged_margins"]["vs_c"] == pytest.approx(4.0)
    assert "| vs_c | 10.0 at 32×, +5.00 | 10.0 at 32×, +3.00 | +4.00 ± 1.41 |" in done.stdout
    assert "the best row reaches it on 1 of 2 seeds" in done.stdout
    assert (tmp_path / "m.png").is_file()
