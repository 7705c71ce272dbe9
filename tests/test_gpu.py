"""CUDA checks (skipped without a GPU): the same code path trains and evaluates on the device."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from varstudent.nn.variational import LinearSVD

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_variational_layer_agrees_between_cpu_and_cuda() -> None:
    layer = LinearSVD(50, 20)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(20, 50) * 6)
    x = torch.randn(8, 50)
    kl_cpu, out_cpu = layer.kl(), layer.eval()(x)
    gpu = layer.cuda()
    torch.testing.assert_close(gpu.kl().cpu(), kl_cpu, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), out_cpu, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory):
    """Prepared digits written without the data-validation gate: a bare GPU node (the lent machine's image) may
    lack great_expectations, and these tests check the CUDA path, not the data (test_data covers the gate)."""
    from varstudent.data import write_prepared
    from varstudent.data.prepare import as_uint8
    from varstudent.data.sources import load_dataset

    out = tmp_path_factory.mktemp("digits-gpu") / "prepare"
    x_train, y_train, x_test, y_test, classes = load_dataset("digits", out.parent / "raw", 0, 0.2)
    write_prepared(out, "digits", as_uint8(x_train), y_train, as_uint8(x_test), y_test, classes)
    return out


def test_distill_stage_runs_on_cuda(tmp_path, digits_dir) -> None:
    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, ["data.dataset=digits", "teacher.arch=mlp-200-200", "student.arch=mlp-100-50",
                                "teacher.epochs=3", "distill.epochs=3", "runtime.device=cuda",
                                "tracking.enabled=false"])
    stages.teacher(params, digits_dir, tmp_path / "teacher")
    torch.cuda.reset_peak_memory_stats()
    metrics = stages.distill(params, digits_dir, tmp_path / "teacher", tmp_path / "distill")
    assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU, not quietly on the CPU
    assert metrics["cuda_graph_epochs"] == 3  # runtime.cuda_graphs is on by default
    # 0.67 on the CPU after these 3 epochs; chance is 0.1
    assert metrics["epochs_run"] == 3 and metrics["student_accuracy"] > 0.4


def test_shifted_teacher_and_student_record_their_steps_as_graphs(tmp_path, digits_dir) -> None:
    """The shift (and, for the student, the teacher's forward on the shifted batch) inside a recorded step."""
    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, ["data.dataset=digits", "teacher.arch=mlp-200-200", "student.arch=mlp-100-50",
                                "teacher.epochs=3", "distill.epochs=3", "runtime.device=cuda",
                                "tracking.enabled=false", "teacher.dropout=0.2", "teacher.shift=1",
                                "distill.shift=1"])
    taught = stages.teacher(params, digits_dir, tmp_path / "teacher")
    metrics = stages.distill(params, digits_dir, tmp_path / "teacher", tmp_path / "distill")
    assert taught["cuda_graph_epochs"] == 3 and metrics["cuda_graph_epochs"] == 3
    assert taught["teacher_accuracy"] > 0.4 and metrics["student_accuracy"] > 0.3  # chance is 0.1
    # a replayed step must hint with the teacher's logits on that replay's own shifted batch: the same run
    # eagerly (same seed; Philox draws replay alike) gives the same hint term epoch by epoch
    eager = dataclasses.replace(params, runtime=dataclasses.replace(params.runtime, cuda_graphs=False))
    assert stages.distill(eager, digits_dir, tmp_path / "teacher", tmp_path / "eager")["cuda_graph_epochs"] == 0
    graphed_rows = json.loads((tmp_path / "distill/history.json").read_text())
    eager_rows = json.loads((tmp_path / "eager/history.json").read_text())
    for graphed_row, eager_row in zip(graphed_rows, eager_rows, strict=True):
        assert graphed_row["kd"] == pytest.approx(eager_row["kd"], rel=1e-3)
        assert graphed_row["loss"] == pytest.approx(eager_row["loss"], rel=1e-3)


def _data(n: int = 1050):  # 10 full batches of 100 and a ragged one of 50
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :32].sum(1) > 0).long() + 2 * (x.flatten(1)[:, 32:].sum(1) > 0).long()
    return x.cuda(), y.cuda()


def _ce(model, logits, targets, index, epoch):
    loss = torch.nn.functional.cross_entropy(logits, targets)
    return loss, {"ce": loss}


def _fit_dense(graphs: bool, epochs: int = 4):
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.train import FitSettings, fit

    torch.manual_seed(0)
    model = build_model(build_spec("mlp-64-32", (1, 8, 8), 4)).cuda()
    x, y = _data()
    settings = FitSettings(epochs=epochs, batch_size=100, lr=0.01, lr_decay_start=0.5, progress=False,
                           cuda_graphs=graphs)
    return model, fit(model, x, y, _ce, settings)


def test_graphed_steps_train_as_the_eager_ones() -> None:
    """No noise in a dense network: replaying the recorded step must give the eager run's losses."""
    eager_model, eager = _fit_dense(False)
    graph_model, graphed = _fit_dense(True)
    assert eager.cuda_graphs == 0 and graphed.cuda_graphs == 4  # one recording per epoch (new lr each)
    assert [r["lr"] for r in graphed.history] == [r["lr"] for r in eager.history]
    for a, b in zip(eager.history, graphed.history):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4) and a["train_accuracy"] == b["train_accuracy"]
    for p, q in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_block_max_abs_backward_on_cuda_matches_autograd() -> None:
    from varstudent.losses import _BlockMaxAbs

    for shape, dim in [((40, 30), 0), ((6, 5, 3, 3), 1)]:
        weight = torch.randn(shape, device="cuda")
        weight.select(dim, 3).copy_(-weight.select(dim, 3).abs())  # a block whose largest |w| is negative
        ours, reference = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        scale = torch.randn(shape[dim], device="cuda")
        others = [d for d in range(len(shape)) if d != dim]
        (_BlockMaxAbs.apply(ours, dim) * scale).sum().backward()
        (reference.abs().amax(others) * scale).sum().backward()
        assert torch.equal(ours.grad, reference.grad)


@pytest.fixture(params=[False, True], ids=["fast-kernels", "deterministic"])
def deterministic(request):
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)  # what runtime.deterministic sets
    yield request.param
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("train_clip", [False, True])
def test_graphed_variational_student_with_every_loss_term(deterministic, train_clip, caplog) -> None:
    from varstudent.losses import BlockSparseRegularizer, LossWeights, kl_warmup, paired_weights, student_loss
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.nn.variational import variational_layers
    from varstudent.train import FitSettings, fit

    x, y = _data()
    teacher, _ = _fit_dense(False, epochs=2)
    with torch.no_grad():
        hint = teacher.eval()(x)
    weights = LossWeights(kd=0.5, temperature=4.0, kd_direction="teacher_student", vd=1.0, bsr=1e-3)
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        student = build_model(build_spec("mlp-32-16", (1, 8, 8), 4, variational=True)).cuda()
        for layer in variational_layers(student):  # the kept-weight mask is computed inside the graph too
            layer.train_clip = train_clip
        bsr = BlockSparseRegularizer(*paired_weights(teacher, student))

        def loss_fn(model, logits, targets, index, epoch, bsr=bsr):
            return student_loss(model, logits, targets, hint[index], weights, kl_warmup(epoch, 2), len(y), bsr)

        settings = FitSettings(epochs=4, batch_size=100, lr=0.01, progress=False, cuda_graphs=graphs)
        runs.append(fit(student, x, y, loss_fn, settings))
    eager, graphed = runs
    assert graphed.cuda_graphs == 4, caplog.text  # recorded, not fallen back to eager steps
    assert set(graphed.history[-1]) == set(eager.history[-1])  # ce, kd, kl, bsr, loss, ...
    for a, b in zip(eager.history, graphed.history):  # every term, BSR (~1 % of the loss) too; on the H100 the
        for term in ("loss", "ce", "kd", "kl", "bsr"):  # graph drew the same noise: the losses were equal
            assert b[term] == pytest.approx(a[term], rel=1e-3), term
    assert graphed.history[-1]["ce"] < graphed.history[0]["ce"]


@pytest.mark.parametrize("how", ["term", "weighted-sum"])
def test_a_diverging_graphed_run_names_the_batch_and_the_cause(how, caplog) -> None:
    from varstudent.errors import TrainingError
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.train import FitSettings, fit

    x, y = _data()
    model = build_model(build_spec("mlp-64-32", (1, 8, 8), 4)).cuda()
    counter = torch.zeros((), device="cuda")

    def exploding(model, logits, targets, index, epoch):  # epoch 2's third batch is the first bad one
        ce = torch.nn.functional.cross_entropy(logits, targets)
        counter.add_(1)
        bad = (counter == 14) if epoch == 1 else torch.zeros((), dtype=torch.bool, device="cuda")
        if how == "term":
            ce = torch.where(bad, torch.full_like(ce, float("inf")), ce)
            return ce, {"ce": ce}
        huge = torch.where(bad, torch.full_like(ce, 3e38), torch.zeros_like(ce))
        return ce + 10 * huge, {"ce": ce, "bsr": huge}  # every term finite, the weighted sum is not

    settings = FitSettings(epochs=3, batch_size=100, lr=0.01, progress=False, cuda_graphs=True)
    cause = "non-finite term: CE" if how == "term" else "every term is finite but their weighted sum is not"
    with caplog.at_level("WARNING", logger="varstudent.train"), \
            pytest.raises(TrainingError, match=rf"at epoch 2, batch 3 \({cause}"):
        fit(model, x, y, exploding, settings)
    assert "could not be recorded" not in caplog.text  # found by the replayed graph, not an eager step


def test_a_checkpointed_eager_run_resumes_with_graphs(tmp_path) -> None:
    from varstudent.checkpoint import Checkpointer
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.train import FitSettings, fit

    x, y = _data()

    def run(graphs: bool, epochs: int, checkpoint=None):
        torch.manual_seed(0)
        model = build_model(build_spec("mlp-64-32", (1, 8, 8), 4)).cuda()
        settings = FitSettings(epochs=epochs, batch_size=100, lr=0.01, lr_decay_start=0.5, progress=False,
                               cuda_graphs=graphs)
        return fit(model, x, y, _ce, settings, checkpoint=checkpoint)

    ckpt = Checkpointer(tmp_path, 1, {"params_digest": "a"}, "teacher")
    run(False, 2, ckpt)  # saved with capturable=False
    resumed = run(True, 4, ckpt)
    reference = run(False, 4)
    assert resumed.cuda_graphs == 2 and resumed.epochs_run == 4
    for a, b in zip(reference.history, resumed.history):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)


def test_a_step_that_breaks_capture_falls_back_to_eager_steps(caplog) -> None:
    from varstudent.nn.architectures import build_model, build_spec
    from varstudent.train import FitSettings, fit

    def syncing(model, logits, targets, index, epoch):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.item()  # a host sync: not allowed while a graph records
        return loss, {"ce": loss}

    x, y = _data()
    torch.manual_seed(0)
    model = build_model(build_spec("mlp-64-32", (1, 8, 8), 4)).cuda()
    settings = FitSettings(epochs=2, batch_size=100, lr=0.01, lr_decay_start=0.5, progress=False, cuda_graphs=True)
    with caplog.at_level("WARNING", logger="varstudent.train"):
        result = fit(model, x, y, syncing, settings)
    assert result.cuda_graphs == 0 and "could not be recorded as a CUDA graph" in caplog.text
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the capture stream was left
    _, eager = _fit_dense(False, epochs=2)
    assert result.history[-1]["ce"] == pytest.approx(eager.history[-1]["ce"], rel=1e-4)


def test_a_step_that_cannot_be_recorded_trains_eagerly(monkeypatch, caplog) -> None:
    from varstudent import train

    def refuse(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train._GraphedStep, "record", refuse)
    with caplog.at_level("WARNING", logger="varstudent.train"):
        _, result = _fit_dense(True, epochs=2)
    assert result.cuda_graphs == 0 and result.epochs_run == 2
    assert "could not be recorded as a CUDA graph" in caplog.text
    _, eager = _fit_dense(False, epochs=2)
    assert result.history[-1]["ce"] == pytest.approx(eager.history[-1]["ce"], rel=1e-4)
