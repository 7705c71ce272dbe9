"""The training loop: convergence stop, divergence, lr schedule; and the model behaves (loss falls, sparsity rises)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from varstudent.errors import TrainingError
from varstudent.losses import LossWeights, student_loss
from varstudent.nn.architectures import build_model, build_spec
from varstudent.train import FitSettings, accuracy, fit, lr_factor


def _ce(model, logits, targets, index, epoch):
    loss = F.cross_entropy(logits, targets)
    return loss, {"ce": loss}


def _toy(n: int = 200):
    x = torch.randn(n, 1, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long()
    return x, y


def test_stops_once_converged_and_says_why() -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
    settings = FitSettings(epochs=200, batch_size=50, lr=0.05, converge_tol=0.05, patience=2, progress=False)
    result = fit(model, x, y, _ce, settings)
    assert result.epochs_run < 200 and result.stop_reason.startswith("converged")
    assert len(result.history) == result.epochs_run


def test_warm_up_epochs_do_not_count_towards_convergence() -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
    settings = FitSettings(epochs=12, batch_size=50, lr=0.0, converge_tol=0.5, patience=1, converge_after=8,
                           progress=False)
    result = fit(model, x, y, _ce, settings)  # lr 0: the loss never changes, so only the warm-up delays the stop
    assert result.epochs_run == 9
    patient = FitSettings(epochs=20, batch_size=50, lr=0.0, converge_tol=0.5, patience=3, converge_after=8,
                          progress=False)
    assert fit(model, x, y, _ce, patient).epochs_run == 11  # three calm epochs after the warm-up: 9, 10, 11


def _scripted(losses: list[float]):
    """A loss whose every batch, hence every epoch, is losses[epoch] (with a zero-weight gradient path)."""
    def loss_fn(m, logits, targets, index, epoch):
        loss = logits.sum() * 0 + losses[epoch]
        return loss, {"ce": loss}
    return loss_fn


@pytest.mark.parametrize("losses, epochs_run", [
    # moves by 10 % an epoch: never calm, runs to the limit
    ([10.0 * 0.9 ** e for e in range(8)], 8),
    # calm, a jump, calm again: the jump resets the count, so the stop waits for two calm epochs after it
    ([1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 5),
    # ~1e4 moving by 50 an epoch: 0.5 % relative change, calm (an absolute test would never stop)
    ([1e4 + 50 * e for e in range(8)], 3),
    # ~1e-3 moving by 20 %: an absolute change of ~1e-4 is under the tolerance, the relative one is not
    ([1e-3 * 1.2 ** e for e in range(8)], 8),
])
def test_the_stop_needs_consecutive_epochs_of_small_relative_change(losses: list[float], epochs_run: int) -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
    settings = FitSettings(epochs=8, batch_size=50, lr=0.01, converge_tol=0.01, patience=2, progress=False)
    result = fit(model, x, y, _scripted(losses), settings)
    assert result.epochs_run == epochs_run
    assert result.stop_reason.startswith("converged") == (epochs_run < 8)
    assert [row["loss"] for row in result.history] == pytest.approx(losses[:epochs_run])


def test_runs_to_the_limit_when_not_converged() -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
    result = fit(model, x, y, _ce, FitSettings(epochs=3, batch_size=50, lr=0.01, progress=False))
    assert result.epochs_run == 3 and "epoch limit" in result.stop_reason


def test_a_non_finite_loss_stops_with_where_and_which_term() -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))

    def exploding(m, logits, targets, index, epoch):
        ce = F.cross_entropy(logits, targets)
        bad = torch.tensor(math.inf) if epoch == 1 else torch.tensor(0.0)
        return ce + bad, {"ce": ce, "kl": bad}

    with pytest.raises(TrainingError, match=r"epoch 2, batch 1 \(non-finite term: VD KL\)"):
        fit(model, x, y, exploding, FitSettings(epochs=3, batch_size=50, lr=0.01, progress=False))


def _subnormal() -> float:
    return (torch.full((1,), 1e-30) * 1e-9).item()  # 1e-39 is below float32's smallest normal (1.2e-38)


def test_subnormals_flush_to_zero_while_training_and_only_then() -> None:
    x, y = _toy()
    model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
    seen = []

    def recording(m, logits, targets, index, epoch):
        seen.append(_subnormal())
        return _ce(m, logits, targets, index, epoch)

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    assert _subnormal() > 0
    fit(model, x, y, recording, FitSettings(epochs=1, batch_size=50, lr=0.01, progress=False))
    assert seen and all(v == 0.0 for v in seen)  # the slow subnormal path is never taken while training
    assert _subnormal() > 0  # and the process's float semantics are back as they were


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc options")
def test_training_reuses_freed_memory_instead_of_faulting_in_new_pages() -> None:
    import resource

    x, y = _toy()
    fit(build_model(build_spec("mlp-8", (1, 2, 2), 2)), x, y, _ce,
        FitSettings(epochs=1, batch_size=50, lr=0.01, progress=False))

    def faults_per_allocation() -> float:
        # 40 MB: above glibc's largest automatic mmap threshold (32 MB), so by default every allocation of
        # this size is a fresh mapping, faulted in page by page when written (~10,000 faults each)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.empty(10_000_000).fill_(1.0)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5

    from varstudent.train import reuse_freed_memory

    assert reuse_freed_memory()  # glibc took both settings
    faults_per_allocation()  # the first allocation may grow the heap
    assert faults_per_allocation() < 500


def test_lr_decays_linearly_to_zero_after_the_start() -> None:
    s = FitSettings(epochs=10, batch_size=1, lr=1.0, lr_decay_start=0.5)
    assert [lr_factor(e, s) for e in (0, 4, 5, 6, 9)] == [1.0, 1.0, 1.0, 0.8, 0.2]
    assert lr_factor(9, FitSettings(epochs=10, batch_size=1, lr=1.0)) == 1.0
    x, y = _toy()  # and fit applies it, epoch by epoch
    settings = FitSettings(epochs=4, batch_size=50, lr=0.02, lr_decay_start=0.5, progress=False)
    result = fit(build_model(build_spec("mlp-8", (1, 2, 2), 2)), x, y, _ce, settings)
    assert [row["lr"] for row in result.history] == pytest.approx([0.02, 0.02, 0.02, 0.01])


@pytest.mark.slow
def test_variational_student_learns_and_sparsifies(digits_dir) -> None:
    # model behaviour: the loss falls, accuracy is far above chance, and the KL term prunes weights
    from varstudent.data import load_prepared
    from varstudent.prune import layer_table

    data = load_prepared(digits_dir)
    student = build_model(build_spec("mlp-100-50", data.input_shape, 10, variational=True))
    # on 1,437 samples the KL per sample is large: a lighter weight keeps the data term in charge
    weights = LossWeights(kd=0, temperature=1, kd_direction="teacher_student", vd=0.2, bsr=0)
    n = data.x_train.shape[0]

    def loss_fn(m, logits, targets, index, epoch):
        return student_loss(m, logits, targets, None, weights, 1.0, n, None)

    result = fit(student, data.x_train, data.y_train, loss_fn,
                 FitSettings(epochs=30, batch_size=50, lr=3e-3, lr_decay_start=0.5, progress=False))
    assert result.history[-1]["ce"] < 0.5 * result.history[0]["ce"]
    assert accuracy(student, data.x_test, data.y_test) > 0.8
    rows = layer_table(student)
    assert sum(r["nonzero"] for r in rows) < 0.5 * sum(r["weights"] for r in rows)


def test_cuda_graphs_setting_is_a_no_op_on_the_cpu() -> None:
    x, y = _toy(230)  # a ragged last batch too
    histories = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model(build_spec("mlp-8", (1, 2, 2), 2))
        settings = FitSettings(epochs=3, batch_size=50, lr=0.05, progress=False, cuda_graphs=graphs)
        result = fit(model, x, y, _ce, settings)
        assert result.cuda_graphs == 0
        histories.append([{k: v for k, v in row.items() if k != "seconds"} for row in result.history])
    assert histories[0] == histories[1]


def test_graphed_step_notes_the_first_non_finite_batch_and_its_terms() -> None:
    """The bookkeeping a CUDA graph does on the device, run here as plain tensor ops on the CPU."""
    from varstudent.train import _GraphedStep

    watch = _GraphedStep(None, None, batch_size=4, device=torch.device("cpu"))
    watch.start(3)  # replays begin at batch 4 (0-based 3)
    one = torch.tensor(1.0)
    watch.watch(one, {"ce": one, "kl": one})
    assert watch.first_divergence() is None
    watch.watch(torch.tensor(float("inf")), {"ce": one, "kl": torch.tensor(float("inf"))})  # batch 5
    watch.watch(torch.tensor(float("nan")), {"ce": torch.tensor(float("nan")), "kl": one})  # later: not kept
    batch, loss, terms = watch.first_divergence()
    assert batch == 4 and loss == float("inf") and list(terms) == ["ce", "kl"]
    assert terms["ce"] == 1.0 and terms["kl"] == float("inf")
    watch.start(0)  # the next epoch forgets it
    assert watch.first_divergence() is None
