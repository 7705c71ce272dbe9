"""The Variational Student loss, one small function per term.

    L = CE(y, z_s)
      + kd_weight  * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))     hint from the frozen teacher
      + vd_weight  * beta(epoch) * sum_layers KL_VD / N                sparse variational dropout
      + bsr_weight * BSR(teacher weights : student weights)            Block Sparse Regularizer

References: Hegde et al., "Variational Student", ICASSP 2020 (arXiv 1910.12061); Molchanov et al., ICML 2017;
Hinton et al. 2015 for the T^2 factor (it keeps the hint's gradient scale independent of T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from varstudent.errors import ConfigError
from varstudent.nn.kernels import bsr_linf, bsr_linf_kernel
from varstudent.nn.variational import weighted_kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            direction: str = "teacher_student") -> torch.Tensor:
    """T^2 * KL between softened distributions, averaged over the batch.

    teacher_student is the usual KD, KL(p_t || p_s); student_teacher is the paper's as reproduced.
    """
    log_ps = F.log_softmax(student_logits / temperature, dim=1)  # (B, classes)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=1)
    if direction == "teacher_student":
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    else:
        kl = (log_ps.exp() * (log_ps - log_pt)).sum(1)
    return temperature ** 2 * kl.mean()


def kl_warmup(epoch: int, warmup_epochs: int) -> float:
    """beta: 0 at epoch 0, rising linearly to 1 at `warmup_epochs` (Molchanov et al.'s reweighting)."""
    return 1.0 if warmup_epochs == 0 else min(1.0, epoch / warmup_epochs)


def _blocks_first(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(blocks, rest): block m is index m of `dim` (0: output units/filters, 1: input units/channels)."""
    return w.transpose(0, dim).reshape(w.shape[dim], -1)


def _blocks_first_shape(shape: torch.Size, dim: int) -> tuple[int, ...]:
    """The shape _blocks_first transposes `shape` to before flattening the rest (for dims 0 and 1)."""
    return (shape[dim], *shape[:dim], *shape[dim + 1:])


class _BlockMaxAbs(torch.autograd.Function):
    """max |w| per block (index of `dim`); its gradient goes to the one arg-max entry of each block.

    autograd's amax backward builds full-size equality masks and the forward an abs() copy of the weights;
    here the forward is two reductions (max and min, with their indices) and the backward one entry per block.
    On the CPU the indices come from NumPy's argmax / argmin, which are vectorized where torch's max(1) /
    min(1) with indices are not (0.08 ms against 0.74 ms for the 500x784 first layer, 2 threads), and the
    gradient is a sparse tensor of those entries: autograd adds it into the dense gradient the layer's own
    forward gives the same weight, where a dense one was allocated, zero-filled and added in full every step.
    (A backward through this term alone leaves a sparse .grad, which fused Adam refuses; in training the
    weight's own layer also contributes a dense one, and autograd sums the two before .grad.)
    On a GPU it is a one-hot select (see backward). For float32 CPU weights with the C kernel built, the whole
    l1/l_inf BSR runs as _LinfBlockTotal instead; this is the path for the GPU, other dtypes and no compiler.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, dim: int) -> torch.Tensor:  # -> (w.shape[dim],)
        if dim not in (0, 1):  # backward rebuilds _blocks_first's layout, which is only this for dims 0 and 1
            raise ValueError(f"_BlockMaxAbs: blocks along dim 0 or 1, not {dim}")
        flat = _blocks_first(w.detach(), dim)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
            values = flat.numpy()
            high_at, low_at = torch.from_numpy(values.argmax(1)).long(), torch.from_numpy(values.argmin(1)).long()
            high, low = flat.gather(1, high_at[:, None])[:, 0], flat.gather(1, low_at[:, None])[:, 0]
        else:
            high, high_at = flat.max(1)
            low, low_at = flat.min(1)
        negative_wins = -low > high
        ctx.save_for_backward(torch.where(negative_wins, low_at, high_at), negative_wins)
        ctx.shape, ctx.dim = w.shape, dim
        return torch.where(negative_wins, -low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        at, negative_wins = ctx.saved_tensors
        signed = torch.where(negative_wins, -grad, grad)
        shape, dim = ctx.shape, ctx.dim
        if grad.device.type != "cpu":
            blocks_first = _blocks_first_shape(shape, dim)
            # a one-hot select, not a scatter: CUDA's deterministic index_put sorts its indices (2.2 ms of a
            # 10 ms MLP step, README "Speed"); this is two elementwise kernels, deterministic by construction
            columns = torch.arange(math.prod(blocks_first[1:]), device=grad.device)
            one_hot = torch.where(columns == at[:, None], signed[:, None], 0)  # where, not *: 0 * inf is nan
            return one_hot.reshape(blocks_first).transpose(0, dim), None
        return _block_entry_gradient(at, signed, shape, dim), None


def _block_entry_gradient(at: torch.Tensor, values: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """A sparse gradient of `shape` holding values[m] at entry at[m] of block m (_blocks_first's layout)."""
    rest = torch.unravel_index(at, _blocks_first_shape(shape, dim)[1:])  # the entry's coordinates within its block
    coords = [*rest[:dim], torch.arange(shape[dim]), *rest[dim:]]  # the block index back at `dim`
    return torch.sparse_coo_tensor(torch.stack(coords), values, shape, is_coalesced=dim == 0,
                                   check_invariants=False)


class _LinfBlockTotal(torch.autograd.Function):
    """The l1/l_inf BSR of every layer in one autograd node, for float32 CPU weights with the C kernel.

    sum over layers of sum(max(teacher_stat, F.pad(max |w| per block))), as BlockSparseRegularizer's
    per-layer path computes it; the gradient is the same to the bit (tests compare them), the value the same
    but for its last bits (summed in double). nn/blockmax.c computes per layer the term and, for each block's
    arg-max entry, the share torch.maximum's backward would pass (all where the student's block is larger,
    half on a tie, none where the teacher's is) times the entry's sign; the backward scales those by the
    upstream gradient into a sparse tensor, which autograd adds into the layer's own dense gradient. The
    per-layer path is ~20 small ops a layer forward and ~15 autograd nodes backward - most of the BSR's cost
    on an MNIST step.
    """

    @staticmethod
    def forward(ctx, dim: int, teacher_stats: tuple[torch.Tensor, ...], *weights: torch.Tensor) -> torch.Tensor:
        total, ctx.dim, ctx.blocks = 0.0, dim, []
        for teacher_stat, w in zip(teacher_stats, weights):
            term, indices, coef = bsr_linf(_blocks_first(w.detach(), dim).contiguous(), teacher_stat, w.shape, dim)
            total += term
            ctx.blocks.append((w.shape, indices, coef))
        return torch.tensor(total, dtype=weights[0].dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, None, *(torch.sparse_coo_tensor(indices, coef * grad, shape, is_coalesced=ctx.dim == 0,
                                                     check_invariants=False)
                             for shape, indices, coef in ctx.blocks)


class BlockSparseRegularizer(nn.Module):
    """sum over blocks m of || W_{T:S}(m) ||, W_{T:S} the teacher's and student's weights stacked.

    Our interpretation of the paper's unstated details:
    - layers are paired by depth (i-th teacher layer with the i-th student layer, same kind);
    - both tensors are zero-padded to their common shape and stacked, so block m holds teacher row m and
      student row m ("out": output units/filters) or column m ("in": input units/channels);
    - norm "linf" is the paper's l1/l_inf (sum of block maxima of |w|); "l2" is the group-lasso l1/l2.
    A block's max |w| or sum of squares is the same with or without zero padding, and the teacher is frozen,
    so its share of every block is a constant computed once here; per step only the student's share is
    computed. Effect: where the teacher's block is large, the student's weights below it go unpenalised
    (linf) or lightly penalised (l2); where the teacher's block is empty, the student's block is pushed
    to zero - the teacher's structure steers which student weights die.
    """

    def __init__(self, teacher_weights: list[torch.Tensor], student_weights: list[nn.Parameter],
                 norm: str = "linf", blocks: str = "out") -> None:
        super().__init__()
        if norm not in ("linf", "l2") or blocks not in ("out", "in"):
            raise ConfigError(f"BSR: unknown norm {norm!r} or blocks {blocks!r}")
        self.norm, self.dim = norm, 0 if blocks == "out" else 1
        self.student_weights = list(student_weights)
        for i, (t, s) in enumerate(zip(teacher_weights, self.student_weights)):
            n_blocks = max(t.shape[self.dim], s.shape[self.dim])
            stat = torch.zeros(n_blocks, device=s.device)
            stat[: t.shape[self.dim]] = self._block_stat(t.detach().to(s.device))
            self.register_buffer(f"teacher_stat_{i}", stat)

    def _fused(self) -> bool:
        """True where _LinfBlockTotal runs: float32 CPU weights and teacher stats, and the C kernel built."""
        tensors = [*self.student_weights, *self.buffers()]
        return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
                and bsr_linf_kernel() is not None)

    def _block_stat(self, w: torch.Tensor) -> torch.Tensor:
        """Per-block max |w| (linf) or sum of w^2 (l2): (blocks,)."""
        if self.norm == "linf":
            return _BlockMaxAbs.apply(w, self.dim)
        flat = _blocks_first(w, self.dim)
        return (flat * flat).sum(1)

    def forward(self) -> torch.Tensor:
        teacher_stats = tuple(getattr(self, f"teacher_stat_{i}") for i in range(len(self.student_weights)))
        if self.norm == "linf" and self._fused():
            return _LinfBlockTotal.apply(self.dim, teacher_stats, *self.student_weights)
        total = torch.zeros((), device=self.student_weights[0].device)
        for teacher_stat, s in zip(teacher_stats, self.student_weights):
            student_stat = F.pad(self._block_stat(s), (0, teacher_stat.numel() - s.shape[self.dim]))
            if self.norm == "linf":
                total = total + torch.maximum(teacher_stat, student_stat).sum()
            else:  # the epsilon keeps the gradient finite for an all-zero block
                total = total + torch.sqrt(teacher_stat + student_stat + 1e-12).sum()
        return total


def paired_weights(teacher: nn.Module, student: nn.Module) -> tuple[list[torch.Tensor], list[nn.Parameter]]:
    """Teacher and student layer weights paired by depth; a mismatch is a configuration error."""
    t_blocks, s_blocks = list(teacher.blocks), list(student.blocks)
    t_kinds, s_kinds = [b.kind for b in t_blocks], [b.kind for b in s_blocks]
    if t_kinds != s_kinds:
        raise ConfigError(f"BSR pairs layers by depth, but the teacher's layers ({'-'.join(t_kinds)}) do "
                          f"not match the student's ({'-'.join(s_kinds)}); set distill.bsr_weight=0 or "
                          "pick architectures of the same depth")
    return [b.op.weight for b in t_blocks], [b.op.weight for b in s_blocks]


@dataclass(frozen=True)
class LossWeights:
    kd: float
    temperature: float
    kd_direction: str
    vd: float
    bsr: float


def student_loss(student: nn.Module, logits: torch.Tensor, targets: torch.Tensor,
                 teacher_logits: torch.Tensor | None, weights: LossWeights, beta: float, n_train: int,
                 bsr: BlockSparseRegularizer | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its terms (unweighted, for the progress bar and history)."""
    terms = {"ce": F.cross_entropy(logits, targets)}
    total = terms["ce"]
    if weights.kd > 0 and teacher_logits is not None:
        terms["kd"] = kd_loss(logits, teacher_logits, weights.temperature, weights.kd_direction)
        total = total + weights.kd * terms["kd"]
    if weights.vd > 0:
        # the ELBO's KL per training sample, weighted; the weight goes into the KL's own backward (no extra pass)
        weighted, plain = weighted_kl(student, weights.vd * beta / n_train)
        terms["kl"] = plain / n_train
        total = total + weighted
    if weights.bsr > 0 and bsr is not None:
        terms["bsr"] = bsr()
        total = total + weights.bsr * terms["bsr"]
    return total, terms
