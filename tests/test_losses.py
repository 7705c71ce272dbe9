"""The loss terms: KD, KL warm-up, the Block Sparse Regularizer, and their composition."""

from __future__ import annotations

import pytest
import torch

from varstudent.errors import ConfigError
from varstudent.losses import (
    BlockSparseRegularizer,
    LossWeights,
    kd_loss,
    kl_warmup,
    paired_weights,
    student_loss,
)
from varstudent.nn.architectures import build_model, build_spec
from varstudent.nn.variational import total_kl


def test_kd_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    z = torch.randn(8, 10)
    assert kd_loss(z, z, 4.0).abs() < 1e-6
    assert kd_loss(z, torch.randn(8, 10), 4.0) > 0


def test_kd_directions_match_their_definitions() -> None:
    zs, zt, t = torch.randn(5, 4), torch.randn(5, 4), 3.0
    ps, pt = torch.softmax(zs / t, 1), torch.softmax(zt / t, 1)
    forward = (pt * (pt.log() - ps.log())).sum(1).mean() * t * t
    reverse = (ps * (ps.log() - pt.log())).sum(1).mean() * t * t
    torch.testing.assert_close(kd_loss(zs, zt, t, "teacher_student"), forward)
    torch.testing.assert_close(kd_loss(zs, zt, t, "student_teacher"), reverse)
    assert not torch.isclose(forward, reverse)


def test_kl_warmup_rises_linearly_to_one() -> None:
    assert [kl_warmup(e, 4) for e in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert kl_warmup(0, 0) == 1.0


def _hand_bsr(teacher: torch.Tensor, student: torch.Tensor, norm: str, dim: int) -> float:
    """Pad both to the common shape, stack, and sum the norm of each block, written out by loops."""
    shape = [max(a, b) for a, b in zip(teacher.shape, student.shape)]
    stacked = torch.zeros(2, *shape)
    stacked[0][tuple(slice(0, s) for s in teacher.shape)] = teacher
    stacked[1][tuple(slice(0, s) for s in student.shape)] = student
    total = 0.0
    for m in range(shape[dim]):
        block = stacked.select(dim + 1, m)
        total += block.abs().max().item() if norm == "linf" else block.pow(2).sum().sqrt().item()
    return total


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("blocks,dim", [("out", 0), ("in", 1)])
def test_bsr_equals_a_hand_computation(norm: str, blocks: str, dim: int) -> None:
    teacher = [torch.tensor([[3.0, -1.0, 0.5], [0.0, 0.2, -0.1], [1.0, 1.0, 1.0], [-4.0, 0.0, 0.0]]),
               torch.randn(5, 3, 3, 3)]
    student = [torch.nn.Parameter(torch.tensor([[-5.0, 0.1], [0.3, -0.4]])),
               torch.nn.Parameter(torch.randn(2, 4, 3, 3))]
    bsr = BlockSparseRegularizer(teacher, student, norm, blocks)
    expected = sum(_hand_bsr(t, s.detach(), norm, dim) for t, s in zip(teacher, student))
    assert bsr().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("shape", "dim"), [((40, 30), 0), ((40, 30), 1), ((6, 5, 3, 3), 0), ((6, 5, 3, 3), 1)])
def test_block_max_abs_matches_autograd(dtype: torch.dtype, shape: tuple[int, ...], dim: int) -> None:
    from varstudent.losses import _BlockMaxAbs

    weight = torch.randn(shape, dtype=torch.float64)
    blocks = weight.transpose(0, dim)  # a view: block m is blocks[m]
    for m in range(shape[dim]):  # one clear maximum per block: bf16 rounding must not make a tie
        at = torch.unravel_index(torch.randint(blocks[m].numel(), ()), blocks[m].shape)
        blocks[m][at] += 10.0
    weight = weight.to(dtype)  # the NumPy path (float32/64) and torch's (bf16)
    weight.select(dim, 3).copy_(-weight.select(dim, 3).abs())  # a block whose largest |w| is negative
    ours, reference = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    scale = torch.randn(shape[dim], dtype=torch.float64).to(dtype)
    others = [d for d in range(len(shape)) if d != dim]
    (_BlockMaxAbs.apply(ours, dim) * scale).sum().backward()
    (reference.abs().amax(others) * scale).sum().backward()
    assert torch.equal(_BlockMaxAbs.apply(weight, dim), weight.abs().amax(others))
    # one entry per block: sign(w) times the block's scale, at the block's arg-max (sparse on the CPU)
    assert torch.equal(ours.grad.to_dense(), reference.grad)
    if dtype in (torch.float32, torch.float64):  # the NumPy path: no full-size tensor built per step
        assert ours.grad.layout == torch.sparse_coo
    with pytest.raises(ValueError, match="dim 0 or 1"):
        _BlockMaxAbs.apply(weight, 2)


def test_block_max_abs_gradient_adds_into_the_layers_dense_gradient() -> None:
    from varstudent.losses import _BlockMaxAbs

    weight = torch.randn(7, 9, requires_grad=True)
    data_gradient = torch.randn(7, 9)
    ((weight * data_gradient).sum() + _BlockMaxAbs.apply(weight, 0).sum()).backward()
    assert weight.grad.layout == torch.strided  # what fused Adam needs
    expected = data_gradient.clone()
    at = weight.detach().abs().argmax(1)
    expected[torch.arange(7), at] += weight.detach()[torch.arange(7), at].sign()
    assert torch.allclose(weight.grad, expected)


@pytest.mark.parametrize("blocks,dim", [("out", 0), ("in", 1)])
def test_fused_linf_bsr_equals_the_per_layer_path_to_the_bit(blocks: str, dim: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent import losses
    from varstudent.nn.kernels import bsr_linf_kernel

    if bsr_linf_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    torch.manual_seed(0)
    teacher = [torch.randn(12, 10), torch.randn(6, 12, 3, 3)]
    student_init = [torch.randn(5, 8), torch.randn(4, 5, 3, 3)]
    first = student_init[0] if dim == 0 else student_init[0].T  # rows here are the layer's blocks
    first[0] = 0.0  # an all-zero block: its gradient goes to its first entry, with a + sign
    first[1, :2] = torch.tensor([-3.0, 3.0])  # a tie between signs: the positive entry wins
    first[1, 2:] = 0.1
    first[2] = -first[2].abs()  # a block whose largest |w| is negative
    teacher_rows = teacher[0] if dim == 0 else teacher[0].T
    teacher_rows[3] = 0.0
    teacher_rows[3, 0] = first[3].abs().max()  # student and teacher block maxima tie: half the gradient
    data_gradient = [torch.randn_like(w) for w in student_init]

    def run(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not fused:
            monkeypatch.setattr(losses, "bsr_linf_kernel", lambda: None)
        student = [torch.nn.Parameter(w.clone()) for w in student_init]
        bsr = BlockSparseRegularizer(teacher, student, "linf", blocks)
        value = bsr()
        assert (value.grad_fn.__class__.__name__ == "_LinfBlockTotalBackward") is fused  # the path under test
        (value * 0.7 + sum((w * g).sum() for w, g in zip(student, data_gradient))).backward()
        monkeypatch.undo()
        return value.detach(), [w.grad for w in student]

    (fused_value, fused_grads), (value, grads) = run(True), run(False)
    torch.testing.assert_close(fused_value, value, rtol=1e-6, atol=0)  # summed in another order
    for a, b in zip(fused_grads, grads):
        assert a.layout == torch.strided and torch.equal(a, b)


def test_bsr_kernel_picks_the_first_largest_entry_and_stays_in_its_row() -> None:
    from varstudent.nn.kernels import bsr_linf, bsr_linf_kernel

    if bsr_linf_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    rows = torch.tensor([[1.0, -2.0, 2.0, -2.0], [0.5, -4.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0],
                         [1.0, 3.0, 3.0, -1.0], [-1.0, -5.0, 0.0, 5.0], [float("nan"), 1.0, 2.0, 3.0]])
    teacher = torch.tensor([1.0, 5.0, 0.0, 3.0, 1.0, 0.0, 7.0])  # a 7th block: the teacher's alone
    term, indices, coef = bsr_linf(rows, teacher, rows.shape, 0)
    at = indices[1]
    assert indices[0].tolist() == list(range(6)) and at[:5].tolist() == [2, 2, 0, 1, 3]
    assert 0 <= at[5] < 4  # a NaN row gives some entry of that row, never one past its end
    values = rows[:5].numpy()  # the NumPy rule it replaces, on the rows without NaN
    negative = -values.min(1) > values.max(1)
    assert at[:5].tolist() == [lo if n else hi for hi, lo, n in zip(values.argmax(1), values.argmin(1), negative)]
    # the student's block larger: 1; the teacher's: 0; a tie: 1/2 - times the winning entry's sign
    assert coef[:5].tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]
    rows[5, 0] = -1.0
    rows[4, 1] = -6.0  # now a negative entry wins its block: the sign turns
    term, indices, coef = bsr_linf(rows, teacher, rows.shape, 0)
    assert indices[1, 4] == 1 and coef[4] == -1.0
    assert term == 2.0 + 5.0 + 0.0 + 3.0 + 6.0 + 3.0 + 7.0  # sum of max(teacher, student) per block


def test_bsr_kernel_wrapper_refuses_what_the_kernel_would_read_past() -> None:
    from varstudent.nn.kernels import bsr_linf, bsr_linf_kernel

    if bsr_linf_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    with pytest.raises(ValueError, match=">= 1 column"):
        bsr_linf(torch.empty(3, 0), torch.zeros(3), torch.Size([3, 0]), 0)  # no entry to pick
    with pytest.raises(ValueError, match="against 2 teacher blocks"):
        bsr_linf(torch.ones(3, 4), torch.zeros(2), torch.Size([3, 4]), 0)  # fewer teacher blocks than rows
    with pytest.raises(ValueError, match="dim 2"):
        bsr_linf(torch.ones(3, 4), torch.zeros(3), torch.Size([2, 2, 3]), 2)
    with pytest.raises(ValueError, match="float64"):
        bsr_linf(torch.ones(3, 4, dtype=torch.float64), torch.zeros(3), torch.Size([3, 4]), 0)


def test_bsr_sends_no_gradient_to_the_teacher() -> None:
    teacher_net = build_model(build_spec("mlp-20-10", (1, 4, 4), 3))
    student_net = build_model(build_spec("mlp-8-4", (1, 4, 4), 3, variational=True))
    bsr = BlockSparseRegularizer(*paired_weights(teacher_net, student_net))
    bsr().backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert any(b.op.weight.grad is not None and b.op.weight.grad.abs().sum() > 0 for b in student_net.blocks)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_student_block_under_an_empty_teacher_block_shrinks_faster(norm: str) -> None:
    # teacher row 0 is all zero, row 1 is large; the two student rows start identical
    teacher = [torch.tensor([[0.0, 0.0, 0.0], [2.0, -2.0, 2.0]])]
    student = torch.nn.Parameter(torch.tensor([[0.5, -0.4, 0.3], [0.5, -0.4, 0.3]]))
    bsr = BlockSparseRegularizer(teacher, [student], norm, "out")
    optimizer = torch.optim.SGD([student], lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        bsr().backward()
        optimizer.step()
    shrink = 1 - student.detach().abs().sum(1) / torch.tensor([1.2, 1.2])
    assert shrink[0] > shrink[1] + 0.05, shrink


def test_bsr_rejects_layers_that_do_not_pair_by_depth() -> None:
    teacher_net = build_model(build_spec("mlp-20-10-10", (1, 4, 4), 3))
    student_net = build_model(build_spec("mlp-8-4", (1, 4, 4), 3, variational=True))
    with pytest.raises(ConfigError, match="pairs layers by depth"):
        paired_weights(teacher_net, student_net)


def test_student_loss_weights_switch_terms_on_and_off() -> None:
    student = build_model(build_spec("mlp-8", (1, 4, 4), 3, variational=True)).train()
    x, y, zt = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,)), torch.randn(6, 3)
    logits = student(x)
    plain = LossWeights(kd=0, temperature=2, kd_direction="teacher_student", vd=0, bsr=0)
    total, terms = student_loss(student, logits, y, zt, plain, 1.0, 100, None)
    assert set(terms) == {"ce"} and torch.equal(total, terms["ce"])
    full = LossWeights(kd=0.5, temperature=2, kd_direction="teacher_student", vd=2.0, bsr=0)
    total, terms = student_loss(student, logits, y, zt, full, 0.5, 100, None)
    expected = terms["ce"] + 0.5 * kd_loss(logits, zt, 2) + 2.0 * 0.5 * total_kl(student) / 100
    torch.testing.assert_close(total, expected)
    # every term on, the other KD direction, and a real BSR: each weighted once, each reported unweighted
    teacher = build_model(build_spec("mlp-12", (1, 4, 4), 3))
    bsr = BlockSparseRegularizer(*paired_weights(teacher, student))
    every = LossWeights(kd=0.5, temperature=2, kd_direction="student_teacher", vd=2.0, bsr=0.1)
    total, terms = student_loss(student, logits, y, zt, every, 0.5, 100, bsr)
    assert set(terms) == {"ce", "kd", "kl", "bsr"} and bsr().item() > 0
    torch.testing.assert_close(terms["kd"], kd_loss(logits, zt, 2, "student_teacher"))
    assert not torch.allclose(terms["kd"], kd_loss(logits, zt, 2, "teacher_student"))
    expected = (terms["ce"] + 0.5 * terms["kd"] + 2.0 * 0.5 * total_kl(student) / 100 + 0.1 * bsr())
    torch.testing.assert_close(total, expected)
