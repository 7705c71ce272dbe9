"""In-process A/B of the C training-step kernels: epochs with vdkl.c as of a git revision against the working
tree's, interleaved with dense-student epochs, all in one process so that both see the same machine.

Epoch times on a shared 2-core machine move by 10-30 % between minutes and invocations; a kernel change worth
a few percent shows only when the two versions alternate epoch by epoch.

    python benchmarks/kernel_ab.py --base HEAD~1 --rounds 6          # from the default run's trained student
    python benchmarks/kernel_ab.py --base HEAD~1 --fresh              # from a freshly initialized student

Rows: VS + BSR with train_clip (the default run's loss weights, random hint logits: the values do not change
the cost); the student from `--student-from` (default artifacts/distill, as `varstudent run` leaves it) or a
fresh one. Each round runs one dense epoch, then one epoch per kernel version from the same starting state and
seed; the printed losses of the two versions should agree (same arithmetic up to float32 rounding). Each
`vd_step` call (the pass before a layer's products, all layers) is timed too: its milliseconds a step resolve
what epoch times cannot.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from varstudent.artifacts import load_model
from varstudent.data import load_prepared
from varstudent.losses import BlockSparseRegularizer, LossWeights, paired_weights, student_loss
from varstudent.nn import kernels, variational
from varstudent.nn.architectures import build_model, build_spec
from varstudent.nn.variational import variational_layers
from varstudent.train import FitSettings, fit

REPO = Path(__file__).resolve().parents[1]


def base_kernels(revision: str, folder: Path) -> tuple:
    """vd_step and vd_step_grads of vdkl.c at `revision`, built as the library builds its own."""
    source = folder / "vdkl.c"
    source.write_bytes(subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:varstudent/nn/vdkl.c"],
                                      check=True, capture_output=True).stdout)
    kernels.compile_library(source, shutil.which("cc") or "gcc", folder / "vdkl.so")
    return kernels.step_functions(ctypes.CDLL(str(folder / "vdkl.so")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision whose vdkl.c is compared with the working tree's")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--data", type=Path, default=Path("artifacts/prepare"))
    parser.add_argument("--student-from", type=Path, default=Path("artifacts/distill"))
    parser.add_argument("--fresh", action="store_true", help="start from a fresh mlp-500-50 student instead")
    args = parser.parse_args()
    current = kernels.vd_step_kernel()
    if current is None:
        parser.error("the C kernels cannot be built here (no compiler, or VARSTUDENT_NO_KERNELS=1)")
    with tempfile.TemporaryDirectory() as tmp:
        versions = {f"vdkl.c at {args.base}": base_kernels(args.base, Path(tmp)), "working tree": current}
        data = load_prepared(args.data)
        x, y, n = data.x_train, data.y_train, data.x_train.shape[0]
        if args.fresh:
            torch.manual_seed(0)
            student = build_model(build_spec("mlp-500-50", data.input_shape, data.num_classes, variational=True))
        else:
            student = load_model(args.student_from, "student")
        for layer in variational_layers(student):
            layer.train_clip = True
            layer.kl_in_forward = True
        teacher = build_model(build_spec("mlp-1200-1200", data.input_shape, data.num_classes))
        teacher_logits = torch.randn(n, data.num_classes)
        settings = FitSettings(epochs=1, batch_size=100, lr=1e-3, progress=False)
        bsr = BlockSparseRegularizer(*paired_weights(teacher, student))
        weights = LossWeights(0.5, 2.0, "teacher_student", 1.5, 1e-5)
        state = {k: v.clone() for k, v in student.state_dict().items()}

        in_step = [0.0]
        untimed = variational.vd_step

        def timed_step(*args, **kwargs):
            started = time.perf_counter()
            try:
                return untimed(*args, **kwargs)
            finally:
                in_step[0] += time.perf_counter() - started

        variational.vd_step = timed_step
        steps = -(-n // settings.batch_size)

        def vs_epoch(pair: tuple) -> tuple[float, float, float]:
            kernels.vd_step_kernel = lambda: pair  # kernels.vd_step looks the pair up at every call
            student.load_state_dict(state)
            torch.manual_seed(0)
            in_step[0] = 0.0

            def loss_fn(m, logits, targets, index, epoch):
                return student_loss(m, logits, targets, teacher_logits[index], weights, 1.0, n, bsr)
            history = fit(student, x, y, loss_fn, settings).history[0]
            return history["seconds"], history["loss"], 1e3 * in_step[0] / steps

        def dense_epoch() -> float:
            torch.manual_seed(0)
            model = build_model(build_spec("mlp-500-50", data.input_shape, data.num_classes, variational=False))

            def loss_fn(m, logits, targets, index, epoch):
                loss = F.cross_entropy(logits, targets)
                return loss, {"ce": loss}
            return fit(model, x, y, loss_fn, settings).history[0]["seconds"]

        seconds: dict[str, list[float]] = {"dense student": [], **{name: [] for name in versions}}
        step_ms: dict[str, list[float]] = {name: [] for name in versions}
        for r in range(args.rounds):
            seconds["dense student"].append(dense_epoch())
            losses = []
            for name, pair in versions.items():
                took, loss, ms = vs_epoch(pair)
                seconds[name].append(took)
                step_ms[name].append(ms)
                losses.append(f"{loss:.6f}")
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items())
                  + f"; losses {' / '.join(losses)}", flush=True)
    kept = [100 * float(layer.keep_mask().float().mean()) for layer in variational_layers(student)]
    print(f"\nVS + BSR train_clip, {'fresh' if args.fresh else args.student_from} student (kept now "
          + ", ".join(f"{k:.1f} %" for k in kept) + f"), {torch.get_num_threads()} threads, {args.rounds} rounds\n")
    print("| kernels | s/epoch, median [range] | × dense, median [range] | vd_step ms a step, median [range] |\n"
          "|---|---|---|---|")
    for name, values in seconds.items():
        ratios = [v / d for v, d in zip(values, seconds["dense student"])]
        ms = step_ms.get(name)
        print(f"| {name} | {statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}] | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] | "
              + (f"{statistics.median(ms):.3f} [{min(ms):.3f}–{max(ms):.3f}] |" if ms else "– |"))
    base, new = (seconds[name] for name in versions)
    change = [100 * (b / a - 1) for a, b in zip(base, new)]
    print(f"\nworking tree vs {args.base}: {statistics.median(change):+.1f} % an epoch "
          f"[{min(change):+.1f} … {max(change):+.1f}]")


if __name__ == "__main__":
    main()
