"""The shortened CIFAR-10 distillation for a lent GPU: VGG-like teacher -> half-width VGG-like sparse student.

The GPU machine has no network and takes at most 64 MiB of files along, so the data is prepared here first and
a stratified subset is packed into one compressed file that travels with the repo:

    varstudent prepare --set data.dataset=cifar10 --out /tmp/c10                      # here (npm + sha256)
    python benchmarks/gpu_cifar10.py pack /tmp/c10/prepare --train 15000 --test 3000 --out .gpu/cifar10.npz
    # on the GPU machine (device tool, carry .gpu):
    python benchmarks/gpu_cifar10.py run .gpu/cifar10.npz --out $OUT --teacher-epochs 30 --distill-epochs 30

`run` calls the library's own stages (teacher, distill, prune, evaluate) and writes, as it goes, each
stage's metrics and per-epoch history (seconds per epoch, test accuracy, sparsity) plus summary.md into --out,
so a run cut short by the time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def pack(args: argparse.Namespace) -> None:
    from safetensors.numpy import load_file

    prepared = Path(args.prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    arrays = load_file(prepared / "data.safetensors")  # the uint8 images, as prepare wrote them
    rng = np.random.default_rng(args.seed)
    classes = manifest["num_classes"]

    def stratified(x, y, n):
        keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n // classes] for c in range(classes)])
        keep = rng.permutation(keep)
        return x[keep], y[keep]

    x_train, y_train = stratified(arrays["x_train"], arrays["y_train"], args.train)
    x_test, y_test = stratified(arrays["x_test"], arrays["y_test"], args.test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                        source=np.array(manifest["dataset"] + ":" + manifest["sha256"]))
    print(f"{out}: {len(y_train)} train / {len(y_test)} test, {out.stat().st_size / 2**20:.1f} MiB")


def run(args: argparse.Namespace) -> None:
    import torch

    from varstudent import stages
    from varstudent.config import load_params
    from varstudent.data import write_prepared

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs-c10-"))
    arrays = np.load(args.data)
    write_prepared(work / "prepare", "cifar10-subset", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                   arrays["y_test"], list(range(10)))
    params = load_params(None, [
        "teacher.arch=vgg-like", f"teacher.width={args.teacher_width}",
        f"teacher.epochs={args.teacher_epochs}", "student.arch=vgg-like", f"student.width={args.student_width}",
        f"distill.epochs={args.distill_epochs}", "distill.converge_tol=0", "runtime.progress=false",
        "tracking.enabled=false", "evaluate.latency_repeats=5", "export.formats=[compact, sparse]", *args.set])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "n_train": int(len(arrays["y_train"])), "n_test": int(len(arrays["y_test"])), "sets": args.set,
            "teacher": f"vgg-like x{args.teacher_width}", "student": f"vgg-like x{args.student_width}"}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    started = time.perf_counter()
    steps = [("teacher", lambda: stages.teacher(params, work / "prepare", work / "teacher")),
             ("distill", lambda: stages.distill(params, work / "prepare", work / "teacher", work / "distill")),
             ("prune", lambda: stages.prune(params, work / "prepare", work / "distill", work / "prune")),
             ("evaluate", lambda: stages.evaluate(params, work / "prepare", work / "teacher", work / "distill",
                                                  work / "prune", work / "evaluate"))]
    for name, call in steps:
        t0 = time.perf_counter()
        metrics = call()
        metrics["stage_seconds"] = time.perf_counter() - t0
        (out / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2))
        history = work / name / "history.json"
        if history.is_file():
            shutil.copyfile(history, out / f"{name}_history.json")
        write_summary(out, info, time.perf_counter() - started)
        print(f"{name} done in {metrics['stage_seconds']:.0f} s", flush=True)


def write_summary(out: Path, info: dict, seconds: float) -> None:
    lines = [f"# CIFAR-10 shortened distillation on {info['device']}", "",
             f"{info['n_train']} train / {info['n_test']} test images (stratified subset), teacher "
             f"{info['teacher']}, student {info['student']}; {seconds:.0f} s so far.", ""]
    for name in ("teacher", "distill"):
        path = out / f"{name}_history.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())
        lines += [f"## {name}", "", "| epoch | s/epoch | train acc | test acc | sparsity % |", "|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {r['seconds']:.2f} | {r['train_accuracy']:.4f} | "
                  f"{r.get('test_accuracy', float('nan')):.4f} | {r.get('sparsity_pct', 0):.1f} |" for r in rows]
        lines.append("")
    ev = out / "evaluate_metrics.json"
    if ev.is_file():
        m = json.loads(ev.read_text())
        lines += ["## result", "", f"- teacher test error {100 * (1 - m['teacher_accuracy']):.2f}%",
                  f"- compact student test error {100 * (1 - m['compact_accuracy']):.2f}%, "
                  f"{m['nonzero_weights']:,} nonzero weights = {m['compression_vs_student']:.1f}x vs the dense "
                  f"student, {m['compression_vs_teacher']:.1f}x vs the teacher",
                  f"- bytes: teacher {m['teacher_bytes']:,}, compact {m['compact_bytes']:,}", ""]
    (out / "summary.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack a stratified subset of prepared CIFAR-10 into one .npz")
    p.add_argument("prepared")
    p.add_argument("--train", type=int, default=15000)
    p.add_argument("--test", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run", help="teacher, distill, prune, evaluate on the packed data")
    r.add_argument("data")
    r.add_argument("--out", required=True)
    r.add_argument("--teacher-epochs", type=int, default=30)
    r.add_argument("--distill-epochs", type=int, default=30)
    r.add_argument("--teacher-width", type=float, default=1.0)
    r.add_argument("--student-width", type=float, default=0.5)
    r.add_argument("--set", action="append", default=[], help="any params override (repeatable)")
    args = parser.parse_args()
    {"pack": pack, "run": run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
