"""Checkpoint/resume, determinism, divergence and the output-folder lock."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import assert_clean_error, cli
from varstudent.checkpoint import Checkpointer
from varstudent.errors import TrainingError
from varstudent.losses import LossWeights, student_loss
from varstudent.nn.architectures import build_model, build_spec
from varstudent.stages import timing_key
from varstudent.train import FitSettings, fit

# a distillation on digits small enough for seconds, with enough steps per epoch (batch 16) that a kill
# lands mid-run; no convergence stop, so every run trains the same number of epochs
DISTILL = ["--set", "data.dataset=digits", "--set", "tracking.enabled=false", "--set", "teacher.arch=mlp-64-64",
           "--set", "student.arch=mlp-32-16", "--set", "distill.epochs=5", "--set", "distill.batch_size=16",
           "--set", "distill.converge_tol=0", "--set", "distill.kl_warmup_epochs=2", "--set", "runtime.progress=false"]


def _toy_variational():
    x = torch.randn(120, 1, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long()
    model = build_model(build_spec("mlp-16", (1, 2, 2), 2, variational=True))
    weights = LossWeights(kd=0, temperature=1, kd_direction="teacher_student", vd=0.1, bsr=0)

    def loss_fn(m, logits, targets, index, epoch):  # the VD layers draw noise: the RNG state matters
        return student_loss(m, logits, targets, None, weights, 1.0, 120, None)

    return model, x, y, loss_fn


class _Killed(Exception):
    pass


def _stop_after(epochs_done: int):
    def epoch_end(epoch: int) -> dict[str, float]:
        if epoch + 1 == epochs_done + 1:  # dies inside the epoch after the checkpoint of `epochs_done`
            raise _Killed
        return {}
    return epoch_end


SETTINGS = FitSettings(epochs=6, batch_size=16, lr=0.01, lr_decay_start=0.5, progress=False)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    whole, x, y, loss_fn = _toy_variational()
    reference = fit(whole, x, y, loss_fn, SETTINGS)

    torch.manual_seed(0)
    model, x, y, loss_fn = _toy_variational()
    ckpt = Checkpointer(tmp_path / "ckpt", 1, {"params_digest": "a"}, "distill")
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(3), ckpt)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-0003.json", "epoch-0003.safetensors"]

    torch.manual_seed(123)  # a differently initialised model and global RNG: the checkpoint must restore both
    fresh, *_ = _toy_variational()
    with caplog.at_level(logging.INFO, logger="varstudent"):
        resumed = fit(fresh, x, y, loss_fn, SETTINGS, checkpoint=ckpt)
    assert "distill: resuming from epoch 3" in caplog.text
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in reference.history]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.history] == strip
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_resumed_run_keeps_counting_calm_epochs_where_it_stopped(tmp_path: Path) -> None:
    # epoch losses 5, 1, 1, 1, ...: calm from epoch 3 on; with patience 3 the stop comes after epoch 5. The kill
    # lands in epoch 4, after the checkpoint of epoch 3 (one calm epoch counted, the previous loss 1): a resume
    # that forgot either would check nothing in epoch 4 and stop only after epoch 7
    losses = [5.0] + [1.0] * 9

    def scripted(m, logits, targets, index, epoch):
        loss = logits.sum() * 0 + losses[epoch]
        return loss, {"ce": loss}

    settings = FitSettings(epochs=10, batch_size=16, lr=0.01, converge_tol=0.01, patience=3, progress=False)
    model, x, y, _ = _toy_variational()
    assert fit(model, x, y, scripted, settings).epochs_run == 5
    ckpt = Checkpointer(tmp_path / "ckpt", 1, {"params_digest": "a"}, "distill")
    with pytest.raises(_Killed):
        fit(model, x, y, scripted, settings, _stop_after(3), ckpt)
    resumed = fit(model, x, y, scripted, settings, checkpoint=ckpt)
    assert resumed.epochs_run == 5 and resumed.stop_reason.startswith("converged")
    assert [row["loss"] for row in resumed.history] == pytest.approx(losses[:5])


def test_a_checkpoint_of_other_settings_is_never_mixed_in(tmp_path: Path, caplog) -> None:
    model, x, y, loss_fn = _toy_variational()
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(2), Checkpointer(tmp_path, 1, {"params_digest": "a"}, "t"))
    other = Checkpointer(tmp_path, 1, {"params_digest": "b"}, "t")
    model, *_ = _toy_variational()
    with caplog.at_level(logging.INFO, logger="varstudent"):
        result = fit(model, x, y, loss_fn, SETTINGS, checkpoint=other)
    assert "made with different params_digest; starting fresh" in caplog.text
    assert "resuming" not in caplog.text and result.epochs_run == 6


def test_a_rerun_with_other_settings_keeps_the_old_checkpoint_until_it_saves_its_own(tmp_path: Path,
                                                                                    caplog) -> None:
    model, x, y, loss_fn = _toy_variational()
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(3), Checkpointer(tmp_path, 1, {"params_digest": "a"}, "t"))
    other = Checkpointer(tmp_path, 2, {"params_digest": "b"}, "t")  # saves after its second epoch
    with caplog.at_level(logging.INFO, logger="varstudent"), pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(1), other)  # killed in its second epoch, before saving
    assert "starting fresh" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0003.json", "epoch-0003.safetensors"]
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(3), other)  # saves epoch 2: the old one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.json", "epoch-0002.safetensors"]
    assert json.loads((tmp_path / "epoch-0002.json").read_text())["fingerprint"] == {"params_digest": "b"}


@pytest.mark.parametrize("loop", ["garbage", {"history": [], "calm_epochs": 0, "seconds": 1.0},
                                  {"history": [1], "calm_epochs": 0, "previous": None, "seconds": 1.0},
                                  {"history": [], "calm_epochs": "0", "previous": None, "seconds": 1.0}])
def test_a_checkpoint_whose_loop_state_is_damaged_is_skipped_for_an_older_one(loop, tmp_path: Path,
                                                                              caplog) -> None:
    model, x, y, loss_fn = _toy_variational()
    ckpt = Checkpointer(tmp_path / "ckpt", 1, {"params_digest": "a"}, "t")
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(2), ckpt)
    shutil.copytree(tmp_path / "ckpt", tmp_path / "older")
    # a newer checkpoint with that loop state, written through the library (a hand edit of its JSON would fail
    # the files' digests first); saving it drops epoch 2, which comes back
    ckpt.save(3, model, torch.optim.Adam(model.parameters()), torch.Generator(), loop)
    for older in (tmp_path / "older").iterdir():
        shutil.copy(older, tmp_path / "ckpt")
    with caplog.at_level(logging.INFO, logger="varstudent"):
        result = fit(model, x, y, loss_fn, SETTINGS, checkpoint=ckpt)
    assert "ignoring checkpoint epoch-0003.json (its loop state is damaged" in caplog.text
    assert "resuming from epoch 2" in caplog.text and result.epochs_run == 6


def test_a_damaged_checkpoint_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    model, x, y, loss_fn = _toy_variational()
    ckpt = Checkpointer(tmp_path, 1, {"params_digest": "a"}, "t")
    with pytest.raises(_Killed):
        fit(model, x, y, loss_fn, SETTINGS, _stop_after(2), ckpt)
    blob = tmp_path / "epoch-0002.safetensors"
    blob.write_bytes(blob.read_bytes()[:-10])
    with caplog.at_level(logging.INFO, logger="varstudent"):
        result = fit(model, x, y, loss_fn, SETTINGS, checkpoint=ckpt)
    assert "ignoring checkpoint epoch-0002.json" in caplog.text and "checksum" in caplog.text
    assert "resuming" not in caplog.text and result.epochs_run == 6


def test_checkpoint_every_sets_the_cadence_and_zero_turns_it_off(digits_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    model, x, y, loss_fn = _toy_variational()
    saved: list[int] = []

    class Recording(Checkpointer):
        def save(self, epochs_done, *args):
            saved.append(epochs_done)
            return super().save(epochs_done, *args)

    fit(model, x, y, loss_fn, SETTINGS, checkpoint=Recording(tmp_path / "every2", 2, {}, "t"))
    assert saved == [2, 4, 6]

    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, [s for s in DISTILL if s != "--set"] + ["teacher.epochs=1", "train.checkpoint_every=0"])
    original, made = stages._checkpointer, []
    # the stage clears its checkpoints on success, so an absent folder alone would prove nothing
    monkeypatch.setattr(stages, "_checkpointer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    stages.teacher(params, digits_dir, tmp_path / "teacher", tmp_path / "never")
    assert made == [None] and not (tmp_path / "never").exists()


def test_divergence_names_the_term_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    model, x, y, _ = _toy_variational()

    def exploding(m, logits, targets, index, epoch):
        ce = F.cross_entropy(logits, targets)
        bsr = torch.tensor(math.nan) if epoch == 3 else torch.tensor(0.0)
        return ce + bsr, {"ce": ce, "bsr": bsr}

    ckpt = Checkpointer(tmp_path, 1, {"params_digest": "a"}, "distill")
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 4, batch 1 \(non-finite term: BSR\).*last good "
                                            r"checkpoint \(epoch 3\) is kept in"):
        fit(model, x, y, exploding, SETTINGS, checkpoint=ckpt)
    assert (tmp_path / "epoch-0003.json").is_file()


def test_an_overflowing_weighted_sum_is_named_as_such() -> None:
    model, x, y, _ = _toy_variational()

    def overflowing(m, logits, targets, index, epoch):
        ce = F.cross_entropy(logits, targets)
        return ce * 1e38 * 1e38, {"ce": ce}

    with pytest.raises(TrainingError, match="every term is finite but their weighted sum is not"):
        fit(model, x, y, overflowing, SETTINGS)


@pytest.fixture(scope="module")
def teacher_out(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT/ with prepare/ and a small trained teacher/, copied into each test's own folder."""
    from varstudent import stages
    from varstudent.config import load_params

    out = tmp_path_factory.mktemp("teacher_out")
    shutil.copytree(digits_dir, out / "prepare")
    params = load_params(None, [s for s in DISTILL if s != "--set"] + ["teacher.epochs=3"])
    stages.teacher(params, out / "prepare", out / "teacher")
    return out


def _workspace(teacher_out: Path, root: Path) -> Path:
    shutil.copytree(teacher_out, root / "artifacts")
    return root


def _comparable(out: Path) -> dict:
    """What two runs must agree on: metrics and history without wall-clock fields, and the weights' bytes."""
    metrics = json.loads((out / "distill/metrics.json").read_text())
    history = json.loads((out / "distill/history.json").read_text())
    return {"metrics": {k: v for k, v in metrics.items() if not timing_key(k)},
            "history": [{k: v for k, v in row.items() if not timing_key(k)} for row in history],
            "weights": (out / "distill/student.safetensors").read_bytes()}


def _varstudent() -> str:
    return shutil.which("varstudent", path=str(Path(sys.executable).parent)) or "varstudent"


@pytest.fixture(scope="module")
def whole_run(teacher_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted `varstudent distill` through the CLI: the reference for resume and determinism."""
    root = _workspace(teacher_out, tmp_path_factory.mktemp("whole"))
    result = cli("distill", *DISTILL, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "artifacts"


@pytest.mark.slow
def test_kill_9_mid_distill_then_rerun_resumes_and_matches_an_uninterrupted_run(teacher_out: Path, whole_run: Path,
                                                                                tmp_path: Path) -> None:
    killed = _workspace(teacher_out, tmp_path)
    ckpt_dir = killed / "artifacts/checkpoints/distill"
    proc = subprocess.Popen([_varstudent(), "distill", *DISTILL], cwd=killed, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    deadline = time.monotonic() + 120
    while not (ckpt_dir / "epoch-0002.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "distill ended before its 2nd checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "artifacts/distill").exists()  # nothing a later stage could mistake for a result

    rerun = cli("distill", *DISTILL, cwd=killed)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    epochs = [int(line.split("resuming from epoch ")[1].split()[0]) for line in rerun.stderr.splitlines()
              if "resuming from epoch" in line]
    assert len(epochs) == 1 and 2 <= epochs[0] < 5, rerun.stderr[-2000:]
    assert "taking over the lock of a finished or dead run" in rerun.stderr
    assert _comparable(killed / "artifacts") == _comparable(whole_run)
    assert not ckpt_dir.exists()  # removed once the stage's outputs are in place


@pytest.mark.slow
def test_two_identical_runs_write_identical_metrics(teacher_out: Path, whole_run: Path, tmp_path: Path) -> None:
    root = _workspace(teacher_out, tmp_path)
    result = cli("distill", *DISTILL, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _comparable(root / "artifacts") == _comparable(whole_run)
    distilled = json.loads((root / "artifacts/distill/metrics.json").read_text())
    assert distilled["train_seconds"] > 0 and distilled["cuda_graph_epochs"] == 0  # timed; no graphs on the CPU


def test_two_identical_teacher_runs_are_identical(digits_dir: Path, tmp_path: Path) -> None:
    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, [s for s in DISTILL if s != "--set"] + ["teacher.epochs=2"])
    runs = []
    for name in ("a", "b"):
        metrics = stages.teacher(params, digits_dir, tmp_path / name, tmp_path / f"ckpt-{name}")
        runs.append(({k: v for k, v in metrics.items() if not timing_key(k)},
                     (tmp_path / name / "teacher.safetensors").read_bytes()))
    assert runs[0] == runs[1]
    assert not (tmp_path / "ckpt-a").exists()  # checkpoints go once the stage is done


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    from varstudent.outputs import out_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from varstudent.outputs import out_lock\n"
                               "with out_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "artifacts")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = cli("prepare", "--set", "data.dataset=digits", "--set", "tracking.enabled=false", cwd=tmp_path)
        assert_clean_error(result, "is in use by another varstudent run", f"pid {holder.pid}")
        assert not (tmp_path / "artifacts/prepare").exists()
    finally:
        holder.kill()
        holder.wait()
    with out_lock(tmp_path / "artifacts"):  # the holder died: its lock is free again
        pass


def test_a_failed_stage_leaves_the_previous_outputs_whole(tmp_path: Path, digits_dir: Path) -> None:
    from varstudent.outputs import staged

    final = tmp_path / "prepare"
    shutil.copytree(digits_dir, final)
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with pytest.raises(RuntimeError), staged(final) as to:
        (to / "manifest.json").write_text("{half")
        raise RuntimeError("killed mid-write")
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepare"]  # no staging folder left behind
    with staged(final) as to:
        (to / "new.txt").write_text("complete")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_a_tracking_server_that_dies_mid_run_is_one_clear_error(tmp_path: Path) -> None:
    from varstudent.config import load_params
    from varstudent.errors import ServiceError
    from varstudent.tracking import Tracker

    class DeadAfterStart:  # the MlflowClient the Tracker connected with; the server went away during the stage
        def create_run(self, *args, **kwargs):
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/create")

    params = load_params(None, ["tracking.enabled=false", "tracking.uri=http://me:pw@127.0.0.1:5000"])
    tracker = Tracker(params)
    tracker.enabled, tracker.client, tracker.experiment_id = True, DeadAfterStart(), "0"
    dirs = {name: tmp_path / name for name in ("prepare", "teacher", "distill")}
    with pytest.raises(ServiceError, match=r"MLflow tracking store http://me:\*\*\*@127.0.0.1:5000: logging the "
                                           r"teacher run failed: Max retries exceeded"):
        with tracker.stage("teacher", dirs) as logged:
            dirs["teacher"].mkdir()
            (dirs["teacher"] / "metrics.json").write_text("{}")
            logged["teacher_accuracy"] = 0.9
    assert (dirs["teacher"] / "metrics.json").is_file()  # the stage's outputs stay; only the log is lost
    assert not (dirs["teacher"] / "mlflow_run.json").exists()  # and no record claims a run that was not logged
    with pytest.raises(TrainingError, match="diverged"):  # the stage's own error wins over the dead server
        with tracker.stage("distill", dirs):
            raise TrainingError("diverged")
