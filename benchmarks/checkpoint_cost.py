"""What a checkpoint costs per epoch, on the default run's models (target: < 3% of the epoch).

Trains the default teacher (mlp-1200-1200, CE) and the default student (mlp-500-50, VS + BSR) for a few
epochs through the real `fit` with a real Checkpointer (every epoch), timing each checkpoint write (model,
Adam moments, RNG states, sha256, atomic renames) against the epoch it follows, and one restore.

    python benchmarks/checkpoint_cost.py --data artifacts/prepare --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from varstudent.checkpoint import Checkpointer
from varstudent.data import load_prepared
from varstudent.losses import BlockSparseRegularizer, LossWeights, paired_weights, student_loss
from varstudent.nn.architectures import build_model, build_spec
from varstudent.train import FitSettings, fit


class TimedCheckpointer(Checkpointer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.save_seconds: list[float] = []

    def save(self, *args, **kwargs):
        started = time.perf_counter()
        path = super().save(*args, **kwargs)
        self.save_seconds.append(time.perf_counter() - started)
        return path


def measure(name: str, model: torch.nn.Module, x, y, loss_fn, epochs: int, folder: Path) -> dict:
    ckpt = TimedCheckpointer(folder / name, 1, {"params_digest": name}, name)
    result = fit(model, x, y, loss_fn, FitSettings(epochs=epochs, batch_size=100, lr=1e-3, progress=False),
                 checkpoint=ckpt)
    epoch_s = statistics.median(h["seconds"] for h in result.history)
    save_s = statistics.median(ckpt.save_seconds)
    size = sum(p.stat().st_size for p in (folder / name).iterdir())
    fresh_optimizer_model = model  # restore into the same objects: the cost is reading + copying, not building
    started = time.perf_counter()
    restored = ckpt.restore(fresh_optimizer_model, torch.optim.Adam(model.parameters()), torch.Generator())
    restore_s = time.perf_counter() - started
    assert restored is not None and restored.epoch == epochs
    return {"model": name, "epoch_s": epoch_s, "save_s": save_s, "pct": 100 * save_s / epoch_s,
            "bytes": size, "restore_s": restore_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/prepare")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = load_prepared(Path(args.data))
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
    torch.manual_seed(0)
    teacher = build_model(build_spec("mlp-1200-1200", data.input_shape, data.num_classes))
    student = build_model(build_spec("mlp-500-50", data.input_shape, data.num_classes, variational=True))
    teacher_logits = torch.randn(n, data.num_classes)  # the values do not change the cost
    bsr = BlockSparseRegularizer(*paired_weights(teacher, student))
    weights = LossWeights(0.3, 4.0, "teacher_student", 1.0, 1e-5)

    def ce(m, logits, targets, index, epoch):
        loss = F.cross_entropy(logits, targets)
        return loss, {"ce": loss}

    def vs(m, logits, targets, index, epoch):
        return student_loss(m, logits, targets, teacher_logits[index], weights, 1.0, n, bsr)

    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure("teacher mlp-1200-1200", teacher, x, y, ce, args.epochs, Path(tmp)),
                measure("student mlp-500-50 (VS+BSR)", student, x, y, vs, args.epochs, Path(tmp))]
    print(f"{n} samples, batch 100, {torch.get_num_threads()} threads, median of {args.epochs} epochs")
    print(f"{'model':<30}{'s/epoch':>9}{'checkpoint s':>14}{'% of epoch':>12}{'bytes':>13}{'restore s':>11}")
    for r in rows:
        print(f"{r['model']:<30}{r['epoch_s']:>9.2f}{r['save_s']:>14.3f}{r['pct']:>11.2f}%{r['bytes']:>13,}"
              f"{r['restore_s']:>11.3f}")


if __name__ == "__main__":
    main()
