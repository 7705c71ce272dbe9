"""Seconds per training step of `train.fit` with and without CUDA graphs (`runtime.cuda_graphs`).

Why: on a GPU the small networks' steps are bound by the host launching ~400 kernels (README, "Speed"):
an H200 ran a VS + BSR MLP step in ~10 ms of which 0.68 ms computed. `fit` now records each epoch's step as a
CUDA graph and replays it; this measures what that buys, through the library's own loop (not a copy of it),
on random data of MNIST's shape, with the loss of each row as `stages.distill` builds it and deterministic
kernels on (the default). The first epoch holds the warm-up steps; the second is timed, and like every epoch it
includes one recording of the graph (about one step's cost) and the epoch's single host sync.

    python benchmarks/gpu_graph_speed.py [--n 12000] [--out DIR]    # ~1 min on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from varstudent.losses import BlockSparseRegularizer, LossWeights, kl_warmup, paired_weights, student_loss
from varstudent.nn.architectures import build_model, build_spec
from varstudent.train import FitSettings, fit

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what seed_everything sets for deterministic runs
SHAPE, CLASSES, BATCH = (1, 28, 28), 10, 100
# name, teacher arch and width, student arch (None: train the teacher itself with CE), loss weights (kd, vd, bsr)
ROWS = [
    ("mlp teacher 784-1200-1200-10, CE", ("mlp-1200-1200", 1.0), None, None),
    ("mlp student 784-500-50-10, VS+BSR", ("mlp-1200-1200", 1.0), "mlp-500-50", (0.3, 1.0, 1e-5)),
    ("lenet5 teacher x2, CE", ("lenet5", 2.0), None, None),
    ("lenet5 student, Sparse VD", ("lenet5", 2.0), "lenet5", (0.0, 1.0, 0.0)),
    ("lenet5 student, VS+BSR", ("lenet5", 2.0), "lenet5", (0.3, 1.0, 1e-5)),
]


def time_row(teacher_arch: tuple[str, float], student_arch: str | None, loss_weights: tuple | None,
             graphs: bool, x: torch.Tensor, y: torch.Tensor) -> dict:
    torch.manual_seed(0)
    device = x.device
    teacher = build_model(build_spec(teacher_arch[0], SHAPE, CLASSES, teacher_arch[1])).to(device)
    if student_arch is None:
        model = teacher

        def loss_fn(_model, logits, targets, _index, _epoch):
            loss = F.cross_entropy(logits, targets)
            return loss, {"ce": loss}
    else:
        model = build_model(build_spec(student_arch, SHAPE, CLASSES, variational=True)).to(device)
        kd, vd, bsr_weight = loss_weights
        bsr = BlockSparseRegularizer(*paired_weights(teacher, model)).to(device) if bsr_weight else None
        weights = LossWeights(kd, 4.0, "teacher_student", vd, bsr_weight)
        hint = torch.randn(x.shape[0], CLASSES, device=device)

        def loss_fn(model_, logits, targets, index, epoch):
            return student_loss(model_, logits, targets, hint[index], weights, kl_warmup(epoch, 5), x.shape[0], bsr)

    settings = FitSettings(epochs=2, batch_size=BATCH, lr=1e-3, progress=False, cuda_graphs=graphs)
    started = time.perf_counter()
    result = fit(model, x, y, loss_fn, settings)
    steps = -(-x.shape[0] // BATCH)
    return {"ms_per_step": 1e3 * result.history[-1]["seconds"] / steps, "graphs_recorded": result.cuda_graphs,
            "loss": result.history[-1]["loss"], "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12_000, help="random training images (steps = n / 100)")
    parser.add_argument("--out", type=Path, default=None, help="write graph_speed.md and .json here")
    parser.add_argument("--only", nargs="*", default=None, help="row names containing these words")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)  # runtime.deterministic's default
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    header = f"{name}, torch {torch.__version__}, {args.n:,} random images of 1x28x28, batch {BATCH}"
    print(header, flush=True)
    x = torch.randn(args.n, *SHAPE, device=device)
    y = torch.randint(0, CLASSES, (args.n,), device=device)
    lines = [f"# train.fit, ms per step: eager vs CUDA graphs ({header})", "",
             "| row | eager ms/step | graphed ms/step | speed-up | graphs recorded | 60k-image epoch, graphed |",
             "|---|---|---|---|---|---|"]
    results = {}
    for row, teacher_arch, student_arch, loss_weights in ROWS:
        if args.only and not any(word in row for word in args.only):
            continue
        eager = time_row(teacher_arch, student_arch, loss_weights, False, x, y)
        graphed = time_row(teacher_arch, student_arch, loss_weights, True, x, y)
        results[row] = {"eager": eager, "graphed": graphed}
        line = (f"| {row} | {eager['ms_per_step']:.2f} | {graphed['ms_per_step']:.2f} | "
                f"{eager['ms_per_step'] / graphed['ms_per_step']:.1f}x | {graphed['graphs_recorded']} | "
                f"{graphed['ms_per_step'] * 600 / 1e3:.2f} s |")
        print(line, flush=True)
        lines.append(line)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph_speed.md").write_text("\n".join(lines) + "\n")
        (args.out / "graph_speed.json").write_text(json.dumps({"header": header, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
