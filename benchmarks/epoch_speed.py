"""Seconds per epoch: dense student vs variational student (VD), + KD, + BSR, + train_clip (params.yaml's
default), through the real `fit`.

Targets (foundation issue): a distillation epoch <= 2.2x a dense-student epoch of the same architecture
and batch; BSR adds <= 10% to an epoch.

    python benchmarks/epoch_speed.py                 # full MNIST in artifacts/prepare, 2 epochs each
    python benchmarks/epoch_speed.py --epochs 3 --rounds 3   # the six configurations 3 times, interleaved
    python benchmarks/epoch_speed.py --sparse-from artifacts/distill   # + epochs at a trained student's sparsity

Every configuration starts from a fresh student, whose weights train_clip has not pruned yet; within a few epochs
it prunes most of them (the default run: over 90 % from its fifth epoch), and the layers keeping at most
KEPT_PRODUCTS_BELOW of their weights then compute the mean's products over the kept ones alone.
`--sparse-from DIR` adds two rows that start from the student saved in DIR (its pruned weights and all), with
those products and without them.

Epoch times on a shared 2-core machine move by 10-30 % between minutes, so with --rounds each ratio is the
median of the ratios within a round (configurations run back to back), with their range.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from varstudent.artifacts import load_model
from varstudent.data import load_prepared
from varstudent.losses import BlockSparseRegularizer, LossWeights, paired_weights, student_loss
from varstudent.nn import variational
from varstudent.nn.architectures import build_model, build_spec
from varstudent.nn.variational import variational_layers
from varstudent.train import FitSettings, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="artifacts/prepare")
    parser.add_argument("--student", default="mlp-500-50")
    parser.add_argument("--teacher", default="mlp-1200-1200")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1, help="run the configurations K times")
    parser.add_argument("--sparse-from", type=Path, default=None,
                        help="a distill output folder: two more rows starting from its student")
    args = parser.parse_args()
    trained = None
    if args.sparse_from is not None:  # its own spec (threshold, width): the rows run at the sparsity printed
        trained = load_model(args.sparse_from, "student")
        if trained.spec["arch"] != args.student:
            parser.error(f"{args.sparse_from} holds a {trained.spec['arch']} student, not {args.student}")
        shares = [float(layer.keep_mask().float().mean()) for layer in variational_layers(trained)]
        print(f"{args.sparse_from}: kept share per layer " + ", ".join(f"{100 * v:.1f} %" for v in shares))
    data = load_prepared(Path(args.data))
    x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
    teacher = build_model(build_spec(args.teacher, data.input_shape, data.num_classes))
    teacher_logits = torch.randn(n, data.num_classes)  # the values do not change the cost
    settings = FitSettings(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, progress=False)

    kept_below = variational.KEPT_PRODUCTS_BELOW

    def timed(is_variational: bool, kd: float, vd: float, bsr_weight: float, train_clip: bool = False,
              start: torch.nn.Module | None = None, kept_products: bool = True) -> float:
        torch.manual_seed(0)
        model = copy.deepcopy(start) if start is not None else build_model(
            build_spec(args.student, data.input_shape, data.num_classes, variational=is_variational))
        variational.KEPT_PRODUCTS_BELOW = kept_below if kept_products else 0.0
        for layer in variational_layers(model):  # as the distill stage sets them
            layer.train_clip = train_clip
            layer.kl_in_forward = vd > 0
        if not is_variational:
            def loss_fn(m, logits, targets, index, epoch):
                loss = F.cross_entropy(logits, targets)
                return loss, {"ce": loss}
        else:
            bsr = BlockSparseRegularizer(*paired_weights(teacher, model)) if bsr_weight else None
            weights = LossWeights(kd, 4.0, "teacher_student", vd, bsr_weight)

            def loss_fn(m, logits, targets, index, epoch):
                return student_loss(m, logits, targets, teacher_logits[index], weights, 1.0, n, bsr)
        result = fit(model, x, y, loss_fn, settings)
        return statistics.median(h["seconds"] for h in result.history)

    configurations = [("dense student (CE)", (False, 0, 0, 0)), ("VD layers, CE only", (True, 0, 0, 0)),
                      ("Sparse VD (CE + KL)", (True, 0, 1, 0)), ("VS (CE + KD + KL)", (True, 1, 1, 0)),
                      ("VS + BSR", (True, 1, 1, 1e-5)), ("VS + BSR, train_clip", (True, 1, 1, 1e-5, True))]
    if trained is not None:
        configurations += [("VS + BSR, train_clip, from the trained student", (True, 1, 1, 1e-5, True, trained)),
                           ("... the same, dense products", (True, 1, 1, 1e-5, True, trained, False))]
    try:
        rounds = [[timed(*setting) for _, setting in configurations] for _ in range(args.rounds)]
    finally:
        variational.KEPT_PRODUCTS_BELOW = kept_below
    print(f"{args.student} on {n} samples, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.epochs} epochs" + (f"; {args.rounds} rounds, medians [range]" if args.rounds > 1 else "")
          + "\n")
    print("| configuration | s/epoch | x dense |\n|---|---|---|")
    for i, (name, _) in enumerate(configurations):
        seconds = [r[i] for r in rounds]
        print(f"| {name} | {_spread(seconds, '.2f')} | {_spread([r[i] / r[0] for r in rounds], '.2f')} |")
    overhead = [100 * (r[4] / r[3] - 1) for r in rounds]
    print(f"\nBSR overhead: {_spread(overhead, '+.1f')} % of a VS epoch")
    clip = [100 * (r[5] / r[4] - 1) for r in rounds]
    print(f"train_clip overhead: {_spread(clip, '+.1f')} % of a VS + BSR epoch")
    if trained is not None:
        kept = [100 * (r[6] / r[7] - 1) for r in rounds]
        print(f"kept-weights products: {_spread(kept, '+.1f')} % of an epoch at the trained student's sparsity")


def _spread(values: list[float], fmt: str) -> str:
    """The median, with [min - max] when there are several values."""
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} [{format(min(values), fmt)} - {format(max(values), fmt)}]"


if __name__ == "__main__":
    main()
