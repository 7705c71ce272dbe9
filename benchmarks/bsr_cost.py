"""What the Block Sparse Regularizer costs per training step, alone: forward + backward of the BSR term on the
paper's MLP pair, with every student weight also receiving a dense gradient (as the layers' own forward gives
it in training, so the BSR's gradient has to be added into it), against the same step without the BSR.

    python benchmarks/bsr_cost.py                    # ms per step, median of 15 interleaved rounds of 50 steps
    python benchmarks/bsr_cost.py --norm l2 --blocks in

The foundation issue's target is on an epoch ("BSR adds <= 10 % to an epoch": benchmarks/epoch_speed.py); an
epoch on this shared machine moves by more than the BSR costs, so this isolates the term itself. The weights
are the untrained architectures' (the cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from varstudent.losses import BlockSparseRegularizer, paired_weights
from varstudent.nn.architectures import build_model, build_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="mlp-1200-1200")
    parser.add_argument("--student", default="mlp-500-50")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--blocks", default="out", choices=["out", "in"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = build_model(build_spec(args.teacher, (1, 28, 28), 10))
    student = build_model(build_spec(args.student, (1, 28, 28), 10, variational=True))
    teacher_weights, student_weights = paired_weights(teacher, student)
    bsr = BlockSparseRegularizer(teacher_weights, student_weights, args.norm, args.blocks)
    layer_gradients = [torch.randn(w.shape) for w in student_weights]

    def step(with_bsr: bool) -> None:
        for w in student_weights:
            w.grad = None
        loss = sum((w * g).sum() for w, g in zip(student_weights, layer_gradients))  # a dense gradient each
        if with_bsr:
            loss = loss + 1e-5 * bsr()
        loss.backward()

    for with_bsr in (False, True):  # warm-up
        for _ in range(10):
            step(with_bsr)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for with_bsr in (False, True):
            started = time.perf_counter()
            for _ in range(args.steps):
                step(with_bsr)
            times[with_bsr].append((time.perf_counter() - started) / args.steps * 1e3)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    added = [b - a for a, b in zip(times[False], times[True])]
    print(f"{args.student} student, {args.teacher} teacher, BSR {args.norm}/{args.blocks}, "
          f"{torch.get_num_threads()} threads: step without BSR {without:.3f} ms, with {with_:.3f} ms; "
          f"the BSR adds {statistics.median(added):.3f} ms (rounds {min(added):.3f}-{max(added):.3f})")


if __name__ == "__main__":
    main()
