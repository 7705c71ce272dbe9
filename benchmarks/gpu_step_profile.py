"""Time one training step of the MLP pair's student on whatever device is present, and profile it.

Why: on a lent H200 a VS + BSR distillation epoch of the 784-500-50-10 student took ~6 s, no faster than on
the 2-core CPU machine. This script separates the configurations (dense CE, VS with and without BSR,
deterministic kernels on/off, the per-step finiteness check on/off) on random data of MNIST's shape, then
prints the profiler's tables (host time per op, launches, device time per kernel).

    python benchmarks/gpu_step_profile.py          # ~30 s; output in benchmarks/results/gpu-mnist-mlp-h200/
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from varstudent.losses import BlockSparseRegularizer, LossWeights, paired_weights, student_loss
from varstudent.nn.architectures import build_model, build_spec

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what seed_everything sets for deterministic runs
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, BATCH, SHAPE = 60000, 100, (1, 28, 28)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_steps(name: str, variational: bool, bsr: bool, deterministic: bool, steps: int = 60,
               finite_check: bool = True, profile: bool = False) -> None:
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    teacher = build_model(build_spec("mlp-1200-1200", SHAPE, 10)).to(DEVICE)
    student = build_model(build_spec("mlp-500-50", SHAPE, 10, variational=variational)).to(DEVICE)
    regularizer = BlockSparseRegularizer(*paired_weights(teacher, student), "linf", "out").to(DEVICE) \
        if bsr else None
    weights = LossWeights(0.3, 4.0, "teacher_student", 1.0, 1e-5 if bsr else 0.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(N, *SHAPE, device=DEVICE), torch.randint(0, 10, (N,), device=DEVICE)
    hint, order = torch.randn(N, 10, device=DEVICE), torch.randperm(N, device=DEVICE)

    def step(i: int) -> None:  # the body of train.fit's inner loop
        index = order[i * BATCH:(i + 1) * BATCH]
        logits = student(x[index])
        if variational:
            loss, _ = student_loss(student, logits, y[index], hint[index], weights, 1.0, N, regularizer)
        else:
            loss = F.cross_entropy(logits, y[index])
        if finite_check and not torch.isfinite(loss):
            raise SystemExit("non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(10):
        step(i)
    synchronize()
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize()
    ms = (time.perf_counter() - started) / steps * 1e3
    print(f"{name}: {ms:.2f} ms/step ({ms * N / BATCH / 1e3:.2f} s/epoch)", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profiler(activities=activities) as prof:
            for i in range(20):
                step(i)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40), flush=True)
        if DEVICE == "cuda":
            print(table.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=40), flush=True)


def main() -> None:
    print(DEVICE, torch.__version__, torch.cuda.get_device_name(0) if DEVICE == "cuda" else "", flush=True)
    time_steps("dense CE", False, False, True)
    time_steps("VS+BSR det", True, True, True)
    time_steps("VS+BSR nondet", True, True, False)
    time_steps("VS no BSR det", True, False, True)
    time_steps("VS+BSR det nosync", True, True, True, finite_check=False)
    time_steps("VS+BSR det prof", True, True, True, steps=20, profile=True)


if __name__ == "__main__":
    main()
