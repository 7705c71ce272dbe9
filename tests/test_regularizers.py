"""Regularizers: the teacher's dropout (a spec key, active only while training), random input shifts for the
teacher and for the student (whose hint is then the teacher's logits on the same shifted batch)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from varstudent.augment import random_shift
from varstudent.nn.architectures import build_model, build_spec
from varstudent.train import FitSettings, accuracy, fit


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """image (C, H, W) moved down by dy and right by dx, zeros shifted in (written out by slicing)."""
    out = torch.zeros_like(image)
    h, w = image.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_random_shift_moves_each_image_by_one_offset_in_range_and_draws_them_all() -> None:
    torch.manual_seed(0)
    x = torch.rand(400, 3, 7, 9) + 0.5  # no zero pixel: a shifted image matches exactly one offset
    out = random_shift(x, 2)
    assert out.shape == x.shape and out.is_contiguous()
    seen = []
    for image, moved in zip(x, out):
        matches = [(dy, dx) for dy, dx in itertools.product(range(-2, 3), repeat=2)
                   if torch.equal(_shifted(image, dy, dx), moved)]
        assert len(matches) == 1
        seen += matches
    assert set(seen) == set(itertools.product(range(-2, 3), repeat=2))  # all 25 offsets are drawn
    assert random_shift(x, 0) is x


def test_dropout_is_a_spec_key_that_acts_only_while_training() -> None:
    plain = build_spec("mlp-32-16", (1, 8, 8), 10)
    spec = build_spec("mlp-32-16", (1, 8, 8), 10, dropout=0.5, input_dropout=0.2)
    assert all("dropout" not in layer for layer in plain["layers"])  # specs without dropout are as before
    assert [layer.get("dropout") for layer in spec["layers"]] == [0.2, 0.5, 0.5]
    torch.manual_seed(0)
    net, reference = build_model(spec), build_model(plain)
    assert net.state_dict().keys() == reference.state_dict().keys()  # no parameters of its own
    reference.load_state_dict(net.state_dict())
    x = torch.rand(64, 1, 8, 8)
    net.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    net.train(), reference.train()
    block_in, op_in = [], []  # the second block's input, and what its linear op then receives
    net.blocks[1].register_forward_pre_hook(lambda _m, args: block_in.append(args[0].detach()))
    net.blocks[1].op.register_forward_pre_hook(lambda _m, args: op_in.append(args[0].detach()))
    first, second = net(x), net(x)
    assert not torch.equal(first, second)
    alive = block_in[0] != 0
    dropped = alive & (op_in[0] == 0)
    assert 0.4 < dropped.sum() / alive.sum() < 0.6  # rate 0.5
    kept = alive & ~dropped
    torch.testing.assert_close(op_in[0][kept], 2 * block_in[0][kept])  # inverted dropout: the rest x 1/(1-p)
    assert torch.equal(reference(x), reference(x))  # no dropout, no noise


def test_fit_trains_on_what_augment_returns() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 1, 4, 4)
    y = (x.flatten(1)[:, :8].sum(1) > 0).long()
    settings = FitSettings(epochs=15, batch_size=20, lr=0.01, progress=False)

    def ce(_model, logits, targets, _index, _epoch):
        loss = F.cross_entropy(logits, targets)
        return loss, {"ce": loss}

    trained = build_model(build_spec("mlp-16", (1, 4, 4), 2))
    fit(trained, x, y, ce, settings)
    blind = build_model(build_spec("mlp-16", (1, 4, 4), 2))
    calls = []
    fit(blind, x, y, ce, settings, augment=lambda batch: calls.append(batch.shape) or torch.zeros_like(batch))
    assert calls[0] == (20, 1, 4, 4) and len(calls) == 15 * 20
    assert accuracy(trained, x, y) > 0.9
    assert accuracy(blind, x, y) < 0.7  # it never saw the inputs: a constant prediction


def test_teacher_stage_trains_with_dropout_and_shifts_and_saves_them(digits_dir: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    from varstudent import augment, stages
    from varstudent.config import load_params

    drawn = []
    original = augment.random_shift
    monkeypatch.setattr(stages, "random_shift",
                        lambda x, max_shift: drawn.append(max_shift) or original(x, max_shift))
    params = load_params(None, ["data.dataset=digits", "tracking.enabled=false", "runtime.progress=false",
                                "teacher.arch=mlp-64-64", "teacher.epochs=20", "teacher.dropout=0.3",
                                "teacher.input_dropout=0.1", "teacher.shift=1"])
    metrics = stages.teacher(params, digits_dir, tmp_path / "teacher")
    from varstudent.data import load_prepared

    n_train = load_prepared(digits_dir).x_train.shape[0]
    assert len(drawn) == 20 * math.ceil(n_train / 100) and set(drawn) == {1}  # every training batch was shifted
    spec = json.loads((tmp_path / "teacher/teacher.json").read_text())["spec"]
    assert [layer.get("dropout") for layer in spec["layers"]] == [0.1, 0.3, 0.3]
    # 0.81 (0.91 without the shift: a pixel is an eighth of a digits image); chance is 0.1
    assert metrics["teacher_accuracy"] > 0.7


def test_a_shifted_student_gets_the_teachers_logits_on_the_same_shifted_batch(digits_dir: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    from varstudent import augment, losses, stages
    from varstudent.artifacts import load_model
    from varstudent.config import load_params

    settings = ["data.dataset=digits", "tracking.enabled=false", "runtime.progress=false",
                "teacher.arch=mlp-64-64", "teacher.epochs=2", "student.arch=mlp-32-16", "distill.epochs=2",
                "distill.shift=1", "distill.bsr_weight=0"]
    stages.teacher(load_params(None, settings), digits_dir, tmp_path / "teacher")
    teacher = load_model(tmp_path / "teacher", "teacher").eval()
    moved, hints = [], []
    original_shift, original_loss = augment.random_shift, losses.student_loss
    monkeypatch.setattr(stages, "random_shift", lambda x, max_shift: moved.append(original_shift(x, max_shift))
                        or moved[-1])
    monkeypatch.setattr(stages, "student_loss", lambda model, logits, targets, hint, *rest:
                        hints.append(hint) or original_loss(model, logits, targets, hint, *rest))
    stages.distill(load_params(None, settings), digits_dir, tmp_path / "teacher", tmp_path / "distill")
    assert len(moved) == len(hints) > 10
    with torch.no_grad():
        for batch, hint in zip(moved, hints):
            torch.testing.assert_close(hint, teacher(batch), rtol=0, atol=0)

    moved.clear(), hints.clear()  # no hint wanted: the images are still shifted, the teacher never runs
    stages.distill(load_params(None, [*settings, "distill.kd_weight=0"]), digits_dir, tmp_path / "teacher",
                   tmp_path / "sparse-vd")
    assert len(moved) == len(hints) > 10 and all(hint is None for hint in hints)


def test_distill_trains_the_student_with_train_clip_when_asked(digits_dir: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    from varstudent import losses, stages
    from varstudent.config import load_params
    from varstudent.nn.variational import variational_layers

    settings = ["data.dataset=digits", "tracking.enabled=false", "runtime.progress=false",
                "teacher.arch=mlp-64-64", "teacher.epochs=1", "student.arch=mlp-32-16", "distill.epochs=1",
                "prune.threshold=2.5"]
    stages.teacher(load_params(None, settings), digits_dir, tmp_path / "teacher")
    seen: list[list[float]] = []
    original_loss = losses.student_loss
    monkeypatch.setattr(stages, "student_loss", lambda model, *rest: seen.append(
        [layer.kl_grad_below for layer in variational_layers(model)]) or original_loss(model, *rest))
    for clip, wanted in [("true", 2.5), ("false", float("inf"))]:
        seen.clear()
        stages.distill(load_params(None, [*settings, f"distill.train_clip={clip}"]), digits_dir,
                       tmp_path / "teacher", tmp_path / f"distill-{clip}")
        assert len(seen) > 5 and all(step == [wanted] * 3 for step in seen)  # every layer, every step
    seen.clear()  # the forward computes the KL for the loss only where the loss has a KL term
    monkeypatch.setattr(stages, "student_loss", lambda model, *rest: seen.append(
        [layer.kl_in_forward for layer in variational_layers(model)]) or original_loss(model, *rest))
    for vd_weight, wanted in [("0", False), ("1.5", True)]:
        seen.clear()
        stages.distill(load_params(None, [*settings, f"distill.vd_weight={vd_weight}"]), digits_dir,
                       tmp_path / "teacher", tmp_path / f"distill-vd{vd_weight}")
        assert len(seen) > 5 and all(step == [wanted] * 3 for step in seen)


def test_mixup_blends_each_image_with_a_partner_of_its_batch_and_the_labels_alike() -> None:
    from varstudent.augment import mixed_targets, mixup

    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 5, 5), torch.randint(0, 10, (64,))
    blended, partner, lam = mixup(x, 0.4)
    assert sorted(partner.tolist()) == list(range(64))  # a permutation of the batch
    assert lam.shape == (64,) and torch.all((lam >= 0) & (lam <= 1))
    assert (lam < 0.1).sum() + (lam > 0.9).sum() > 20  # Beta(0.4, 0.4): most weights near 0 or 1
    torch.testing.assert_close(blended, x * lam[:, None, None, None] + x[partner] * (1 - lam[:, None, None, None]))
    targets = mixed_targets(y, partner, lam, 10)
    torch.testing.assert_close(targets.sum(1), torch.ones(64))
    for i in range(64):
        expected = torch.zeros(10)
        expected[y[i]] += lam[i]
        expected[y[partner[i]]] += 1 - lam[i]
        torch.testing.assert_close(targets[i], expected)
    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 5, 5), torch.randint(0, 10, (64,))
    assert torch.equal(mixup(x, 0.4)[0], blended)  # drawn from the seeded default generator


def test_a_mixup_student_gets_the_teachers_logits_on_the_blend_and_blended_labels(digits_dir: Path,
                                                                                  tmp_path: Path, monkeypatch) -> None:
    from varstudent import augment, losses, stages
    from varstudent.artifacts import load_model
    from varstudent.config import load_params
    from varstudent.data import load_prepared

    settings = ["data.dataset=digits", "tracking.enabled=false", "runtime.progress=false",
                "teacher.arch=mlp-64-64", "teacher.epochs=2", "student.arch=mlp-32-16", "distill.epochs=2",
                "distill.mixup=0.4", "distill.bsr_weight=0"]
    stages.teacher(load_params(None, settings), digits_dir, tmp_path / "teacher")
    teacher = load_model(tmp_path / "teacher", "teacher").eval()
    drawn, labels, seen = [], [], []
    original_mixup, original_targets, original_loss = augment.mixup, augment.mixed_targets, losses.student_loss
    monkeypatch.setattr(stages, "mixup", lambda x, alpha: drawn.append(original_mixup(x, alpha)) or drawn[-1])
    monkeypatch.setattr(stages, "mixed_targets", lambda targets, *rest: labels.append(targets) or
                        original_targets(targets, *rest))
    monkeypatch.setattr(stages, "student_loss", lambda model, logits, targets, hint, *rest:
                        seen.append((targets, hint)) or original_loss(model, logits, targets, hint, *rest))
    stages.distill(load_params(None, settings), digits_dir, tmp_path / "teacher", tmp_path / "distill")
    n_train = load_prepared(digits_dir).x_train.shape[0]
    assert len(drawn) == len(labels) == len(seen) == 2 * math.ceil(n_train / 100)  # every batch blended
    with torch.no_grad():
        for (blended, partner, lam), y, (targets, hint) in zip(drawn, labels, seen):
            torch.testing.assert_close(hint, teacher(blended), rtol=0, atol=0)  # the hint on the blend
            assert y.dtype == torch.int64  # the batch's own labels, blended with the same partners and weights
            torch.testing.assert_close(targets, original_targets(y, partner, lam, 10), rtol=0, atol=0)
    assert all(((lam > 0.05) & (lam < 0.95)).any() for _, _, lam in drawn)  # blends, not copies

    drawn.clear(), labels.clear(), seen.clear()  # mixup without a hint: blended labels, the teacher never runs
    stages.distill(load_params(None, [*settings, "distill.kd_weight=0"]), digits_dir, tmp_path / "teacher",
                   tmp_path / "sparse-vd")
    assert len(drawn) == len(seen) > 10 and all(hint is None for _, hint in seen)
    assert all(targets.dim() == 2 for targets, _ in seen)
