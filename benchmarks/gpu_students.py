"""Train several students of one experiment in parallel on a lent GPU; prune and evaluate them here, on the CPU.

The full budget (200 epochs) of `reproduce.py mnist-mlp` is ~25 minutes per student on the 2-core CPU
machine, two hours for the table. A lent GPU has 15 minutes, no network, and takes at most 64 MiB along, so
only the distill stage travels: the data is prepared and the teacher trained here, packed into `.gpu/`, and
each row's `stages.distill` runs as its own process on the GPU (rows side by side share the card: two
LeNet-5 rows ran at 1.4-1.7 s an epoch each, one alone at 0.75 s). Pruning, the exports and the CPU
latencies are measured back here, by `reproduce.py --reuse-students`, so every number in the table comes from
the same machine as the others.

    python benchmarks/reproduce.py mnist-mlp --full --out W --only             # here: data + teacher
    python benchmarks/gpu_students.py pack W --out .gpu                          # here: 15 MiB
    # on the GPU machine (device tool, carry .gpu; no install there: export PYTHONPATH=$PWD first),
    # rows in priority order, NAME:key=v,key=v:
    python benchmarks/gpu_students.py run .gpu --out $OUT --deadline 500 \\
        --row sparse_vd:distill.kd_weight=0,distill.bsr_weight=0 --row vs_bsr: ...
    # here: unpack the students into W/<row>/distill, then the table, plots and exports
    python benchmarks/gpu_students.py unpack $FILES_AT --into W
    python benchmarks/reproduce.py mnist-mlp --full --out W --reuse-teacher --reuse-students --only ...

With the steps replayed as CUDA graphs the teacher fits the same call, so the whole full form needs no training
here: `pack W --out .gpu/x --experiment NAME --full` writes only the experiment's params and prepared data;
`run .gpu/x ... --experiment NAME --method vs_bsr --method sparse_vd` trains the teacher there first (returned
as teacher.tar.gz, which `unpack` puts in W/teacher) and names and sets the rows as the experiment's methods.

`run` writes, as it goes, summary.md (epochs done, seconds per epoch, test accuracy, sparsity) and one
NAME.tar.gz per finished student into --out, so a run cut short still returns what it finished. When a
higher-priority row's projected finish passes --deadline (seconds after start), the lowest-priority row still
training is stopped, which frees the GPU for the rows before it; a late row that is last of all runs on.

Measured: before `train.fit` replayed its steps as CUDA graphs, the MLP student's step was bound by kernel
launches on the host (~10 ms for VS + BSR on an H200, benchmarks/results/gpu-mnist-mlp-h200/), so a 200-epoch
row needed ~20 minutes. With graphs (`runtime.cuda_graphs`, on by default) two 200-epoch LeNet-5 students
trained side by side on an H100 in 331 s (1.4-1.7 s an epoch each; one alone 0.75 s an epoch), and a
LeNet-300-100 student in 0.39 s an epoch (benchmarks/results/gpu-mnist-lenet-h100/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

EPOCH_LINE = re.compile(r"distill epoch (\d+)/(\d+) .*?seconds=([\d.e+-]+).*?test_accuracy=([\d.e+-]+)"
                        r".*?sparsity_pct=([\d.e+-]+)")


def _reproduce():
    """reproduce.py beside this file: the experiments, their params and the bench settings, defined once."""
    sys.path.insert(0, str(Path(__file__).parent))
    import reproduce

    return reproduce


def _experiment_rows(experiment: str, methods: list[str]) -> list[str]:
    """NAME:key=v,... rows for methods of benchmarks/experiments/EXPERIMENT.yaml (the table's row names)."""
    exp = _reproduce().load_experiment(experiment)
    unknown = [m for m in methods if m not in exp.methods or exp.methods[m] == "dense"]
    if unknown:
        sys.exit(f"{experiment} has no variational method {', '.join(unknown)} (known: {', '.join(exp.methods)})")
    return [f"{m}:{','.join(exp.methods[m])}" for m in methods]


def pack(args: argparse.Namespace) -> None:
    from safetensors.numpy import load_file

    work, out = Path(args.work), Path(args.out)
    if args.experiment:  # a fresh reproduce.py folder: its params and prepared data, no teacher yet
        from varstudent import stages

        reproduce = _reproduce()
        exp = reproduce.load_experiment(args.experiment)
        if list(exp.datasets) != [""]:
            sys.exit(f"{args.experiment} runs on several datasets (W/<label>/): pack each label's folder instead")
        if (work / "teacher").exists() or (work / "prepare").exists():
            sys.exit(f"{work} already holds a teacher or prepared data; --experiment starts a fresh folder")
        budget = exp.full if args.full else exp.quick
        params = reproduce.effective_params(exp, [*reproduce.BENCH_SETS, *budget, *args.set], work)
        stages.prepare(params, work / "prepare")
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((work / "prepare" / "manifest.json").read_text())
    arrays = load_file(work / "prepare" / "data.safetensors")
    np.savez_compressed(out / "data.npz", **arrays, dataset=np.array(manifest["dataset"]),
                        sha256=np.array(manifest["sha256"]), classes=np.arange(manifest["num_classes"]))
    shutil.rmtree(out / "teacher", ignore_errors=True)
    has_teacher = (work / "teacher" / "metrics.json").is_file()
    if has_teacher:
        shutil.copytree(work / "teacher", out / "teacher")
    shutil.copyfile(work / "params.yaml", out / "params.yaml")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: data ({manifest['n_train']} train / {manifest['n_test']} test), "
          f"{'teacher' if has_teacher else 'no teacher (run trains it)'}, params.yaml; {size / 2**20:.1f} MiB")


def _teacher(src: Path, work: Path, out: Path, sets: list[str]) -> Path:
    """The packed teacher, or one trained here first by the library's teacher stage (returned as teacher.tar.gz)."""
    if (src / "teacher" / "metrics.json").is_file():
        return src / "teacher"
    import logging

    from varstudent import stages
    from varstudent.config import load_params

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    params = load_params(src / "params.yaml", [*sets, "runtime.progress=false"])
    metrics = stages.teacher(params, work / "prepare", work / "teacher")
    with tarfile.open(out / "teacher.tar.gz", "w:gz") as tar:
        tar.add(work / "teacher", arcname="teacher")
    print("TEACHER", json.dumps(metrics), flush=True)
    return work / "teacher"


def one(args: argparse.Namespace) -> None:
    """One student: the library's distill stage, nothing else (a child process of `run`)."""
    import logging

    from varstudent import stages
    from varstudent.config import load_params

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    params = load_params(args.params, args.set)
    metrics = stages.distill(params, Path(args.data), Path(args.teacher), Path(args.distill))
    # what reproduce.py --reuse-students checks before it takes this student
    (Path(args.distill) / "params.yaml").write_text(params.to_yaml())
    print("DONE", json.dumps(metrics), flush=True)


def _progress(log: Path) -> list[tuple[int, int, float, float, float]]:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return [(int(a), int(b), float(s), float(acc), float(sp)) for a, b, s, acc, sp in EPOCH_LINE.findall(text)]


def run(args: argparse.Namespace) -> None:
    import torch

    from varstudent.data import write_prepared

    started = time.monotonic()
    if bool(args.experiment) != bool(args.method):
        sys.exit("--experiment and --method go together: the methods are looked up in the experiment")
    rows = args.row + (_experiment_rows(args.experiment, args.method) if args.method else [])
    if not rows:
        sys.exit("no rows: give --row NAME:key=v,... or --experiment NAME --method M")
    if len(rows) > 5:  # the device returns at most 8 files: info, summary, teacher and one per row
        sys.exit(f"{len(rows)} rows: at most 5 fit what a device call returns (8 files)")
    src, out = Path(args.packed), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vs-gpu-"))
    arrays = np.load(src / "data.npz")
    manifest = write_prepared(work / "prepare", str(arrays["dataset"]), arrays["x_train"], arrays["y_train"],
                              arrays["x_test"], arrays["y_test"], arrays["classes"].tolist())
    info = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "same_data": manifest["sha256"] == str(arrays["sha256"]),
            "rows": rows, "parallel": len(rows)}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), flush=True)
    if not info["same_data"]:
        sys.exit("the prepared data written here differs from the packed one (sha256)")
    teacher = _teacher(src, work, out, args.set)
    threads = max(1, (os.cpu_count() or 2) // len(rows))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    state: dict[str, str] = {}
    for text in rows:
        name, _, sets = text.partition(":")
        cmd = [sys.executable, __file__, "one", "--params", str(src / "params.yaml"), "--data",
               str(work / "prepare"), "--teacher", str(teacher), "--distill", str(work / name / "distill"),
               *[a for s in sets.split(",") if s for a in ("--set", s)],
               *[a for s in args.set for a in ("--set", s)]]
        (work / name).mkdir(parents=True)
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 - the child writes it until it ends
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        state[name] = "training"
    rates: dict[str, list[tuple[float, int]]] = {name: [] for name in procs}
    projected: dict[str, float] = {}  # seconds after start each row would end at its current rate
    while any(s == "training" for s in state.values()):
        time.sleep(args.poll)
        now = time.monotonic() - started
        for name, proc in procs.items():
            if state[name] != "training":
                continue
            epochs = _progress(work / f"{name}.log")
            rates[name].append((now, len(epochs)))
            if proc.poll() is not None:
                state[name] = "done" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
                if proc.returncode == 0:
                    with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
                        tar.add(work / name / "distill", arcname="distill")
                else:
                    shutil.copyfile(work / f"{name}.log", out / f"{name}.log")
        # project each row's finish from its rate over the last minute; stop the lowest-priority row if late
        late = []
        for name in procs:
            points = [p for p in rates[name] if p[0] >= now - 60] if state[name] == "training" else []
            # at least 30 s of epochs at the current sharing before a rate is trusted
            if len(points) >= 2 and points[-1][1] > points[0][1] and points[-1][0] - points[0][0] >= 30:
                per_epoch = (points[-1][0] - points[0][0]) / (points[-1][1] - points[0][1])
                total = _progress(work / f"{name}.log")[-1][1]
                projected[name] = now + per_epoch * (total - points[-1][1])
                if projected[name] > args.deadline:
                    late.append(name)
        victim = row_to_stop([n for n in procs if state[n] == "training"], late)
        if victim is not None:
            procs[victim].send_signal(signal.SIGTERM)
            procs[victim].wait()
            others = ", ".join(n for n in late if n != victim)
            state[victim] = f"stopped at {now:.0f} s so that {others} could finish by the deadline"
            rates = {n: [] for n in procs}  # the others speed up: measure afresh
        write_summary(out, info, work, state, projected, time.monotonic() - started)
    write_summary(out, info, work, state, projected, time.monotonic() - started)
    print((out / "summary.md").read_text(), flush=True)


def row_to_stop(training: list[str], late: list[str]) -> str | None:
    """The lowest-priority row still training, when a row before it would miss the deadline; else None.

    A late row that is last of all runs on: it speeds up as the others end, and stopping it would lose it (it
    was once stopped needlessly that way, benchmarks/results/gpu-mnist-lenet-h100/README.md).
    """
    if len(training) < 2 or not any(name != training[-1] for name in late):
        return None
    return training[-1]


def write_summary(out: Path, info: dict, work: Path, state: dict[str, str], projected: dict[str, float],
                  seconds: float) -> None:
    lines = [f"# {len(state)} students trained in parallel on {info['device']} (torch {info['torch']})", "",
             f"{seconds:.0f} s since start.", "",
             "| row | state | epochs | s/epoch (median) | test acc | sparsity % | projected end, s |",
             "|---|---|---|---|---|---|---|"]
    for name, status in state.items():
        epochs = _progress(work / f"{name}.log")
        if epochs:
            last = epochs[-1]
            lines.append(f"| {name} | {status} | {last[0]}/{last[1]} | "
                         f"{float(np.median([e[2] for e in epochs])):.2f} | {last[3]:.4f} | {last[4]:.1f} | "
                         f"{projected.get(name, float('nan')):.0f} |")
        else:
            lines.append(f"| {name} | {status} | 0 | | | | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def unpack(args: argparse.Namespace) -> None:
    into = Path(args.into)
    for archive in sorted(Path(args.files).glob("*.tar.gz")):
        name = archive.name.removesuffix(".tar.gz")
        if name == "teacher":  # trained on the GPU: where reproduce.py --reuse-teacher looks
            shutil.rmtree(into / "teacher", ignore_errors=True)
            with tarfile.open(archive) as tar:
                tar.extractall(into, filter="data")
            print(f"{archive} -> {into / 'teacher'}")
            continue
        target = into / name
        shutil.rmtree(target / "distill", ignore_errors=True)
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        print(f"{archive} -> {target / 'distill'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="the prepared data, teacher (if trained) and params of a reproduce.py folder")
    p.add_argument("work")
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", help="make WORK (new) from this experiment: params + prepared data only")
    p.add_argument("--full", action="store_true", help="with --experiment: the published budget")
    p.add_argument("--set", action="append", default=[], help="with --experiment: override (repeatable)")
    r = sub.add_parser("run", help="train the rows in parallel (on the GPU machine)")
    r.add_argument("packed")
    r.add_argument("--out", required=True)
    r.add_argument("--row", action="append", default=[], help="NAME:key=v,key=v (highest priority first)")
    r.add_argument("--experiment", help="with --method: rows named and set as in this experiment's methods")
    r.add_argument("--method", action="append", default=[], help="a method of --experiment (after the --row rows)")
    r.add_argument("--set", action="append", default=[], help="override for every row")
    r.add_argument("--deadline", type=float, default=500.0, help="seconds after start every row should end by")
    r.add_argument("--poll", type=float, default=10.0)
    o = sub.add_parser("one", help=argparse.SUPPRESS)
    o.add_argument("--params", required=True)
    o.add_argument("--data", required=True)
    o.add_argument("--teacher", required=True)
    o.add_argument("--distill", required=True)
    o.add_argument("--set", action="append", default=[])
    u = sub.add_parser("unpack", help="the students a run returned, into a reproduce.py folder")
    u.add_argument("files")
    u.add_argument("--into", required=True)
    args = parser.parse_args()
    {"pack": pack, "run": run, "one": one, "unpack": unpack}[args.command](args)


if __name__ == "__main__":
    main()
