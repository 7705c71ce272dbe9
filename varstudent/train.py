"""One training loop for the teacher and the student: progress, lr schedule, convergence, divergence.

Data lives in memory as tensors on the training device, and batches are taken by index: for MNIST-sized
data this is several times faster than a DataLoader, and the index is what picks the cached teacher
logits of each batch (an `augment`, e.g. distill.shift, transforms the batch after it is taken).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from varstudent.errors import TrainingError

if TYPE_CHECKING:
    from varstudent.checkpoint import Checkpointer

log = logging.getLogger("varstudent.train")

# loss_fn(model, logits, targets, batch_index, epoch) -> (total loss, {term name: value})
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    lr: float
    lr_decay_start: float = 1.0  # fraction of epochs after which lr falls linearly to 0
    converge_tol: float = 0.0  # 0 disables the convergence stop
    patience: int = 3
    converge_after: int = 0  # epochs excluded from the convergence check (KL warm-up)
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    cuda_graphs: bool = False  # replay each full-size step as one CUDA graph (CUDA, one process only)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = "max_epochs"
    epochs_run: int = 0
    seconds: float = 0.0
    cuda_graphs: int = 0  # steps recorded as CUDA graphs (one per epoch when they are on)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        from varstudent.errors import ConfigError
        raise ConfigError("runtime.device is cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def lr_factor(epoch: int, settings: FitSettings) -> float:
    start = settings.lr_decay_start * settings.epochs
    if epoch < start or settings.lr_decay_start >= 1.0:
        return 1.0
    return max(0.0, (settings.epochs - epoch) / (settings.epochs - start))


def _progress(total: int, settings: FitSettings):
    from tqdm.auto import tqdm

    enabled = settings.progress and sys.stderr.isatty()
    return tqdm(total=total, desc=settings.desc, unit="step", disable=not enabled, leave=False,
                dynamic_ncols=True)


# the loss terms by the names the method uses, for the divergence message
TERM_NAMES = {"ce": "CE", "kd": "KD", "kl": "VD KL", "bsr": "BSR"}


def _divergence(settings: FitSettings, loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int,
                step: int | None, checkpoint: Checkpointer | None) -> TrainingError:
    bad = [TERM_NAMES.get(k, k) for k, v in terms.items() if not torch.isfinite(v)]
    which = (f"non-finite term: {', '.join(bad)}" if bad else
             "every term is finite but their weighted sum is not: a loss weight is too large")
    kept = checkpoint.last_good_epoch() if checkpoint is not None else None
    where = (f"; the last good checkpoint (epoch {kept}) is kept in {checkpoint.directory}" if kept is not None
             else "")
    at = f"epoch {epoch + 1}" + (f", batch {step + 1}" if step is not None else "")
    return TrainingError(f"{settings.desc}: loss is {loss.item()} at {at} ({which}); lower the lr or the loss "
                         f"weights{where}")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, settings: FitSettings,
        epoch_end: Callable[[int], dict[str, float]] | None = None,
        checkpoint: Checkpointer | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FitResult:
    """Adam over shuffled mini-batches; stops at `epochs` or once the epoch loss has converged. `augment`, if
    given, transforms every batch of inputs before the forward pass (random draws from the default generator).

    Converged: |L_e - L_{e-1}| / |L_{e-1}| < converge_tol for `patience` consecutive epochs, counting only
    epochs after `converge_after` (the loss moves by design while the KL weight warms up).
    With a `checkpoint`, the state is saved every `checkpoint.every` epochs and a matching earlier
    checkpoint is resumed: the loop continues exactly where it stopped (same RNG streams, same moments).

    Subnormal floats are flushed to zero while it runs (CPU): once a network fits its data, gradients and
    Adam's moments underflow into subnormals, which x86 cores compute ~100x slower - one cause of a
    200-epoch teacher's epochs drifting from 6 s to ~30 s (README, "Long CPU runs"). Turned off on return.
    On the CPU, freed tensor memory is also kept for reuse from then on (see `reuse_freed_memory`).
    """
    if x.device.type == "cpu":
        reuse_freed_memory()
    torch.set_flush_denormal(True)  # a no-op returning False where the CPU has no flush-to-zero mode
    try:
        return _fit(model, x, y, loss_fn, settings, epoch_end, checkpoint, augment)
    finally:
        torch.set_flush_denormal(False)


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 64 MiB (32 MiB on older glibc) for reuse instead of handing them
    back to the kernel; True where both settings took.

    Why: PyTorch's CPU allocator is plain malloc, and glibc serves blocks this size with fresh mmaps or trims
    them off its heap when freed, so every training step's gradients and temporaries (several MB each step)
    come back as new pages, each faulted in on first touch: ~470 page faults and ~1 ms of kernel time a step
    for the variational MNIST student, ~150 for the dense one. With these two settings the step reuses the
    last step's memory (~1 fault a step); the process keeps up to its peak use. Process-wide and permanent
    (malloc options have no getter to restore), set once; glibc on Linux only, elsewhere it returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2 on 64-bit); 2.36 here takes 64
    mmap_set = bool(mallopt(m_mmap_threshold, 64 << 20)) or bool(mallopt(m_mmap_threshold, 32 << 20))
    trim_set = bool(mallopt(m_trim_threshold, 256 << 20))
    if not (mmap_set and trim_set):
        log.debug("glibc malloc options not all taken (mmap threshold %s, trim threshold %s)", mmap_set, trim_set)
    return mmap_set and trim_set


class _GraphedStep:
    """A training step recorded once per epoch as a CUDA graph and replayed for every full-size batch.

    Why: the networks here are small, so on a GPU a step is bound by the host launching its ~400 kernels
    (~10 ms), not by the ~0.7 ms they compute (README, "Speed"); a replay launches them all at once. Recorded
    again every epoch, so what a step bakes in as plain numbers - the lr, the KL warm-up weight - is that
    epoch's. The batch's sample indices are copied into one fixed buffer before each replay, and the step's
    outputs (loss, terms, correct count) land in fixed tensors. The first recording is preceded by a few eager
    steps on a side stream (real batches, as CUDA graphs require); a batch of another size runs eagerly.
    A replay cannot stop for the host to look at the loss, so the graph itself notes the batch number and the
    terms of the epoch's first non-finite loss (`watch`), which the loop reads once at the epoch's end.
    """

    WARMUP_STEPS = 3
    MAX_WATCHED = 16  # the loss and its terms; more terms than this fall back to the epoch sums' check

    def __init__(self, step: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None,
                 optimizer: torch.optim.Optimizer | None, batch_size: int, device: torch.device) -> None:
        self.step, self.optimizer = step, optimizer
        self.index = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.warmup_steps = 0
        self.recorded = 0
        self.batch = torch.zeros((), dtype=torch.long, device=device)  # the batch a replay is on
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(self.MAX_WATCHED, device=device)  # loss, then the terms, at first_bad
        self.term_names: list[str] = []

    def watch(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Device-side: remember the batch number and values of the first non-finite loss; count the batch."""
        if len(terms) + 1 <= self.MAX_WATCHED:
            self.term_names = list(terms)
            values = torch.stack([loss.detach(), *(v.detach() for v in terms.values())]).to(self.bad_values.dtype)
            first = (self.first_bad < 0) & ~torch.isfinite(loss)
            self.first_bad.copy_(torch.where(first, self.batch, self.first_bad))
            kept = self.bad_values[:values.numel()]
            kept.copy_(torch.where(first, values, kept))
        self.batch.add_(1)

    def first_divergence(self) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]] | None:
        """(batch, loss, terms) of the first non-finite loss since `start`, or None; one host sync."""
        batch = int(self.first_bad)
        if batch < 0:
            return None
        values = self.bad_values[:len(self.term_names) + 1].cpu()
        return batch, values[0], dict(zip(self.term_names, values[1:]))

    def start(self, batch: int) -> None:
        """Before an epoch's first replay: number the replays from `batch`, forget earlier divergences."""
        self.batch.fill_(batch)
        self.first_bad.fill_(-1)

    def warmup(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        self.warmup_steps += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(index)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def record(self) -> None:
        self.graph = None  # frees the last epoch's graph and its memory pool first
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step(self.index)
        except RuntimeError:
            # a capture that fails inside ends in capture_end's error, which skips restoring the stream
            torch.cuda.set_stream(stream)
            raise
        self.graph = graph
        self.recorded += 1

    def __call__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        self.index.copy_(index)
        self.graph.replay()
        return self.outputs


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, settings: FitSettings,
         epoch_end: Callable[[int], dict[str, float]] | None,
         checkpoint: Checkpointer | None,
         augment: Callable[[torch.Tensor], torch.Tensor] | None) -> FitResult:
    from varstudent import distributed  # under torchrun: DDP, each process takes a slice of every batch

    n = x.shape[0]
    steps = math.ceil(n / settings.batch_size)
    step_model = distributed.wrap(model)
    # graphs are recorded on the current CUDA device: data on another one trains eagerly
    graphed = (settings.cuda_graphs and x.device.type == "cuda" and not distributed.is_worker()
               and x.device.index in (None, torch.cuda.current_device()))
    # the fused Adam step (one kernel over all parameters) halves a dense-MLP epoch on the CPU. Fused Adam keeps
    # its step counter on the GPU anyway; capturable=True is what lets a graph record optimizer.step()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=x.device.type in ("cpu", "cuda"),
                                 capturable=graphed)
    if graphed:  # the warm-up and ragged-batch steps run uncaptured on purpose: no warning about them
        optimizer._warned_capturable_if_run_uncaptured = True
    generator = torch.Generator().manual_seed(settings.seed)
    result, calm_epochs, previous = FitResult(), 0, None
    first_epoch, seconds_before = 0, 0.0
    resumed = checkpoint.restore(model, optimizer, generator) if checkpoint is not None else None
    if resumed is not None:
        first_epoch, loop = resumed.epoch, resumed.loop
        result.history, calm_epochs, previous = loop["history"], loop["calm_epochs"], loop["previous"]
        result.epochs_run, seconds_before = resumed.epoch, loop["seconds"]
        for group in optimizer.param_groups:  # a checkpoint saved without graphs restores capturable=False
            group["capturable"] = graphed

    def train_step(index: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = step_model(x[index] if augment is None else augment(x[index]))
        loss, terms = loss_fn(model, logits, y[index], index, epoch)
        if graphed and torch.cuda.is_current_stream_capturing():
            graph.watch(loss, terms)  # a replay cannot stop midway: the loop reads this at the epoch's end
        elif not torch.isfinite(loss):
            raise _Diverged(loss, terms)
        optimizer.zero_grad(set_to_none=not graphed)  # a graph reuses its gradient buffers
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # batch sums of the means, so that an epoch's sum over batches is exact
            batch = index.numel()
            sums = {k: v.detach() * batch for k, v in {"loss": loss, **terms}.items()}
            return {**sums, "correct": (logits.argmax(1) == y[index]).sum().to(loss.dtype)}

    graph = _GraphedStep(train_step, optimizer, settings.batch_size, x.device) if graphed else None
    started = time.perf_counter()
    bar = _progress(settings.epochs * steps, settings)
    bar.update(first_epoch * steps)
    for epoch in range(first_epoch, settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(epoch, settings)
        model.train()
        order = torch.randperm(n, generator=generator).to(x.device)
        sums: list[torch.Tensor] = []  # accumulated on the device: no host sync per step
        keys: list[str] = []
        epoch_started = time.perf_counter()
        for step in range(steps):
            index = distributed.shard(order[step * settings.batch_size:(step + 1) * settings.batch_size])
            try:
                if graph is None or index.numel() != settings.batch_size:
                    out = train_step(index)
                elif graph.warmup_steps < _GraphedStep.WARMUP_STEPS:
                    out = graph.warmup(index)
                elif graph.graph is None and not _record(graph, settings.desc, step):
                    graph = None  # a step this build cannot record: the rest of the run is eager
                    out = train_step(index)
                else:
                    out = graph(index)
            except _Diverged as diverged:
                bar.close()
                raise _divergence(settings, diverged.loss, diverged.terms, epoch, step, checkpoint) from None
            if not sums:
                keys = list(out)
                sums = [torch.zeros((), device=x.device, dtype=v.dtype) for v in out.values()]
            torch._foreach_add_(sums, list(out.values()))  # one kernel for all the sums
            bar.update(1)
            if step % 50 == 0 and bar.n:
                bar.set_postfix(epoch=epoch + 1, loss=f"{out['loss'].item() / index.numel():.4f}")
        if graph is not None:
            replayed = graph.graph is not None
            graph.graph = None  # next epoch records again, with its own lr and loss weights
            result.cuda_graphs = graph.recorded
            diverged = graph.first_divergence() if replayed else None
            if diverged is not None:
                bar.close()
                raise _divergence(settings, diverged[1], diverged[2], epoch, diverged[0], checkpoint)
        totals = distributed.all_sum(dict(zip(keys, sums)))
        correct = totals.pop("correct")
        if graphed and not torch.isfinite(totals["loss"]):  # a backstop: sums of finite losses can overflow too
            bar.close()
            raise _divergence(settings, totals["loss"] / n, {k: v for k, v in totals.items() if k != "loss"},
                              epoch, None, checkpoint)
        row = {k: v.item() / n for k, v in totals.items()}
        row.update(epoch=epoch + 1, train_accuracy=correct.item() / n, lr=optimizer.param_groups[0]["lr"],
                   seconds=time.perf_counter() - epoch_started)
        if epoch_end is not None:
            row.update(epoch_end(epoch))
        result.history.append(row)
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if k != "epoch"}
        bar.set_postfix(epoch=epoch + 1, **shown)
        log.info("%s epoch %d/%d %s", settings.desc, epoch + 1, settings.epochs,
                 " ".join(f"{k}={v}" for k, v in shown.items()))
        result.epochs_run = epoch + 1
        if previous is not None and epoch >= settings.converge_after and settings.converge_tol > 0:
            change = abs(row["loss"] - previous) / max(abs(previous), 1e-12)
            calm_epochs = calm_epochs + 1 if change < settings.converge_tol else 0
            if calm_epochs >= settings.patience:
                result.stop_reason = (f"converged: relative loss change < {settings.converge_tol} for "
                                      f"{settings.patience} epochs")
                break
        previous = row["loss"]
        if checkpoint is not None and checkpoint.due(epoch + 1):
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                bar.close()  # a finite loss can still leave an inf gradient step behind: never save that
                raise TrainingError(f"{settings.desc}: the weights became non-finite in epoch {epoch + 1}; "
                                    "lower the lr or the loss weights (the last good checkpoint is kept in "
                                    f"{checkpoint.directory})")
            checkpoint.save(epoch + 1, model, optimizer, generator, {
                "history": result.history, "calm_epochs": calm_epochs, "previous": previous,
                "seconds": seconds_before + time.perf_counter() - started})
    bar.close()
    if result.stop_reason == "max_epochs":
        result.stop_reason = f"reached the epoch limit ({settings.epochs})"
    log.info("%s stopped after %d epochs: %s%s", settings.desc, result.epochs_run, result.stop_reason,
             f"; {result.cuda_graphs} epochs replayed their steps as CUDA graphs" if result.cuda_graphs else "")
    result.seconds = seconds_before + time.perf_counter() - started
    return result


def _record(graph: _GraphedStep, desc: str, step: int) -> bool:
    """Record the step before batch `step` (0-based) replays; False, with a warning, where it cannot be."""
    try:
        graph.record()
    except RuntimeError as error:  # e.g. an op that synchronizes with the host inside the step
        cause = error.__context__ or error  # capture_end's own error hides the op that broke the capture
        log.warning("%s: the training step could not be recorded as a CUDA graph (%s); training on without",
                    desc, (str(cause).splitlines() or [type(cause).__name__])[0])
        graph.optimizer.zero_grad(set_to_none=True)
        return False
    graph.start(step)
    return True


class _Diverged(Exception):
    def __init__(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        super().__init__("non-finite loss")
        self.loss, self.terms = loss, terms


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()
