"""The ablation table of the foundation issue: teacher, dense student, Sparse VD, KD, VS, VS+BSR.

Every method gets the same epoch budget, the same data and the same teacher (trained once). Each row runs
the library's own stage functions (teacher / distill / prune / evaluate), so the numbers are what
`varstudent run` produces.

    python benchmarks/ablation.py --epochs 60                       # full MNIST, the paper's MLP pair
    python benchmarks/ablation.py --epochs 60 --only vs_bsr --variant kd03:distill.kd_weight=0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from varstudent import stages
from varstudent.config import load_params
from varstudent.evaluate import markdown_table

# method -> the loss-weight overrides that define it (everything else from params.yaml)
METHODS = {
    "sparse_vd": ["distill.kd_weight=0", "distill.bsr_weight=0"],
    "kd": ["distill.vd_weight=0", "distill.bsr_weight=0"],
    "vs": ["distill.bsr_weight=0"],
    "vs_bsr": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], help="override for every row")
    parser.add_argument("--epochs", type=int, help="the one epoch budget of every trained model")
    parser.add_argument("--out", default="benchmarks/out/ablation")
    parser.add_argument("--only", nargs="*",
                        help="methods to run (default: all, plus the dense student); none = only the variants")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=v,key=v - an extra VS+BSR row with these overrides")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep OUT/teacher and OUT/dense_student if they exist")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    budget = [f"teacher.epochs={args.epochs}", f"distill.epochs={args.epochs}"] if args.epochs else []
    base = [*args.set, *budget, "tracking.enabled=false", "runtime.progress=false",
            "evaluate.latency_repeats=10"]
    params = load_params(args.params, base)
    out = Path(args.out)
    rows, started = [], time.perf_counter()

    data_dir = out / "prepare"
    if not (data_dir / "manifest.json").is_file():
        stages.prepare(params, data_dir)
    teacher_dir = out / "teacher"
    if not (args.reuse_teacher and (teacher_dir / "teacher.json").is_file()):
        t = stages.teacher(params, data_dir, teacher_dir)
        print(f"teacher: {100 * (1 - t['teacher_accuracy']):.2f}% error, {t['train_seconds']:.0f} s", flush=True)
    teacher_metrics = json.loads((teacher_dir / "metrics.json").read_text())
    rows.append({"method": "teacher", "error %": 100 * (1 - teacher_metrics["teacher_accuracy"]),
                 "weights": teacher_metrics["teacher_weights"], "nonzero": teacher_metrics["teacher_weights"],
                 "x vs student": "", "x vs teacher": 1.0,
                 "bytes": (teacher_dir / "teacher.safetensors").stat().st_size,
                 "seconds": teacher_metrics["train_seconds"]})

    if args.only is None:
        # the dense student: the student architecture trained like the teacher, with cross-entropy only
        dense_params = dataclasses.replace(params, teacher=dataclasses.replace(
            params.teacher, arch=params.student.arch, width=params.student.width))
        dense_dir = out / "dense_student"
        if args.reuse_teacher and (dense_dir / "metrics.json").is_file():
            d = json.loads((dense_dir / "metrics.json").read_text())
        else:
            d = stages.teacher(dense_params, data_dir, dense_dir)
        rows.append({"method": "dense student", "error %": 100 * (1 - d["teacher_accuracy"]),
                     "weights": d["teacher_weights"], "nonzero": d["teacher_weights"], "x vs student": 1.0,
                     "x vs teacher": teacher_metrics["teacher_weights"] / d["teacher_weights"],
                     "bytes": (out / "dense_student" / "teacher.safetensors").stat().st_size,
                     "seconds": d["train_seconds"]})
        print(f"dense student: {rows[-1]['error %']:.2f}% error", flush=True)

    runs = {m: METHODS[m] for m in (METHODS if args.only is None else args.only)}
    for text in args.variant:
        name, _, sets = text.partition(":")
        runs[name] = [s for s in sets.split(",") if s]
    for method, overrides in runs.items():
        p = load_params(args.params, [*base, *overrides])
        run_dir = out / method
        dist = stages.distill(p, data_dir, teacher_dir, run_dir / "distill")
        stages.prune(p, data_dir, run_dir / "distill", run_dir / "prune")
        ev = stages.evaluate(p, data_dir, teacher_dir, run_dir / "distill", run_dir / "prune", run_dir / "evaluate")
        rows.append({"method": method, "error %": 100 * (1 - ev["compact_accuracy"]),
                     "weights": ev["student_weights"], "nonzero": ev["nonzero_weights"],
                     "x vs student": ev["compression_vs_student"], "x vs teacher": ev["compression_vs_teacher"],
                     "bytes": ev["compact_bytes"], "seconds": dist["train_seconds"],
                     "s/epoch": dist["seconds_per_epoch"], "epochs": dist["epochs_run"],
                     "settings": " ".join(overrides)})
        print(f"{method}: {rows[-1]['error %']:.2f}% error at {ev['compression_vs_student']:.1f}x "
              f"({dist['epochs_run']} epochs, {dist['stop_reason']})", flush=True)

    columns = ["method", "error %", "weights", "nonzero", "x vs student", "x vs teacher", "bytes", "seconds",
               "s/epoch", "epochs"]
    table = markdown_table(rows, columns)
    header = (f"dataset {params.data.dataset}, teacher {params.teacher.arch}, student {params.student.arch}, "
              f"epoch budget {params.distill.epochs}, seed {params.seed}; total {time.perf_counter() - started:.0f} s")
    print(header + "\n\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(f"{header}\n\n{table}\n\nCommand: {' '.join(sys.argv)}\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
