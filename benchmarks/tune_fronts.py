"""Pareto fronts of VS+BSR, Sparse VD alone and KD alone at an equal trial budget, and trials/hour with 1
and 2 local workers. Not a test: the numbers go into the README.

Every method is one study of `varstudent tune` (the library's own study code, the same teacher trained once
on the same tuning split, NSGA-II, the same seed); the methods differ only in which distill settings are
fixed at zero:
    vs_bsr     everything searched
    sparse_vd  kd_weight = bsr_weight = 0 fixed
    kd         vd_weight = bsr_weight = 0 fixed (no sparsification: its compression stays ~1x)

Hypervolume is computed in (validation accuracy %, log10 compression) space w.r.t. the reference point
(REF_ACCURACY %, 1x). "VS beats Sparse VD at equal compression" compares, at each Sparse VD front point,
the best VS accuracy at that compression or more.

    python benchmarks/tune_fronts.py --trials 10 --epochs 30 --teacher-epochs 20
    python benchmarks/tune_fronts.py --throughput-trials 4     # adds trials/hour with 1 and 2 workers
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

from varstudent import tune
from varstudent.config import load_params

METHODS = {
    "vs_bsr": [],
    "sparse_vd": ["tune.fixed=[kd_weight,bsr_weight]", "distill.kd_weight=0", "distill.bsr_weight=0"],
    "kd": ["tune.fixed=[vd_weight,bsr_weight]", "distill.vd_weight=0", "distill.bsr_weight=0"],
}
REF_ACCURACY = 80.0  # % ; the hypervolume's reference point is (80 %, 1x)


def front_points(rows: list[dict], front: list[int]) -> list[tuple[float, float]]:
    """(compression, accuracy %) of the front, by compression."""
    by_number = {r["number"]: r for r in rows}
    return sorted((by_number[n]["compression"], 100 * by_number[n]["val_accuracy"]) for n in front)


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by the front above (REF_ACCURACY, log10 1x) in (log10 compression, accuracy %)."""
    area, best_acc = 0.0, REF_ACCURACY
    # sweep from the most compressed point down: each adds the strip of accuracy it raises
    for compression, acc in sorted(points, reverse=True):
        x = math.log10(max(compression, 1.0))
        if acc > best_acc:
            area += x * (acc - best_acc)
            best_acc = acc
    return area


def accuracy_at(points: list[tuple[float, float]], compression: float) -> float | None:
    """The front's best accuracy at this compression or more (None where it does not reach it)."""
    reach = [acc for c, acc in points if c >= compression]
    return max(reach) if reach else None


def run_method(name: str, base: list[str], out: Path, trials: int) -> dict:
    params = load_params(None, [*base, *METHODS[name], f"tune.study_name={name}", f"tune.n_trials={trials}"])
    teacher_dir = tune.prepare_study_inputs(params, out, None)
    study = tune.open_study(params, tune.open_storage(params, tune.storage_url(params, out)))
    started = time.perf_counter()
    tune.work(study, params, out, teacher_dir, [])
    seconds = time.perf_counter() - started
    rows, front = tune.trial_rows(study), tune.pareto_numbers(study)
    points = front_points(rows, front)
    return {"method": name, "trials": len(rows), "failed": sum(r["state"] == "FAIL" for r in rows),
            "seconds": seconds, "front": points, "hypervolume": hypervolume(points),
            "front_trials": [r for r in rows if r["number"] in front]}


def throughput(workers: int, base: list[str], out: Path, trials: int) -> dict:
    """Wall time of a fresh study of `trials` trials with `workers` local processes (the CLI path)."""
    name = f"throughput_{workers}w"
    args = [a for o in [*base, f"tune.n_trials={trials}"] for a in ("--set", o)]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "varstudent.cli", "tune", "--workers", str(workers), "--study", name,
                    "--out", str(out), "--no-report", *args], check=True)
    seconds = time.perf_counter() - started
    params = load_params(None, [*base, f"tune.study_name={name}"])
    # two workers may both take the last free slot: count what ran, not the budget
    ran = len(tune.open_study(params, tune.open_storage(params, tune.storage_url(params, out))).get_trials())
    return {"workers": workers, "trials": ran, "seconds": seconds, "trials_per_hour": 3600 * ran / seconds}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(results):
        xs, ys = zip(*r["front"], strict=True) if r["front"] else ((), ())
        ax.plot(xs, ys, "o-", drawstyle="steps-pre", color=f"C{i}",
                label=f"{r['method']} (HV {r['hypervolume']:.1f})")
    ax.set_xscale("log")
    ax.set_xlabel("compression (dense student weights / nonzero)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("Pareto fronts at an equal trial budget (MNIST-5k, MLP pair)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trial budget of each method")
    parser.add_argument("--epochs", type=int, default=30, help="distill epochs of every trial")
    parser.add_argument("--teacher-epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--throughput-trials", type=int, default=0, help="0 = skip the 1-vs-2-worker run")
    parser.add_argument("--out", default="benchmarks/out/tune_fronts")
    parser.add_argument("--png", default="docs/img/tune_fronts.png")
    parser.add_argument("--set", action="append", default=[], help="extra override for every study")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from OUT/summary.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((Path(args.out) / "summary.json").read_text())["methods"], Path(args.png))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("varstudent.train").setLevel(logging.WARNING)
    base = ["data.dataset=mnist5k", "teacher.arch=mlp-1200-1200", "student.arch=mlp-500-50",
            f"teacher.epochs={args.teacher_epochs}", f"distill.epochs={args.epochs}", "distill.converge_tol=0",
            "tune.population_size=5", "tracking.enabled=false", "runtime.progress=false", *args.set]
    out = Path(args.out)
    started = time.perf_counter()
    results = [run_method(m, base, out, args.trials) for m in args.methods]
    summary: dict = {"settings": base, "trials_per_method": args.trials, "reference_point":
                     {"val_accuracy_pct": REF_ACCURACY, "compression": 1.0}, "methods": results}
    by_method = {r["method"]: r for r in results}
    if "vs_bsr" in by_method and "sparse_vd" in by_method:
        gaps = []
        # only the useful part of Sparse VD's front: points above the reference accuracy (a collapsed
        # student at chance level sits on every front at huge compression and compares nothing)
        for compression, acc in sorted(set(p for p in by_method["sparse_vd"]["front"] if p[1] > REF_ACCURACY)):
            vs_acc = accuracy_at(by_method["vs_bsr"]["front"], compression)
            gaps.append({"compression": compression, "sparse_vd_accuracy": acc, "vs_accuracy": vs_acc,
                         "gap_points": None if vs_acc is None else vs_acc - acc})
        summary["vs_minus_sparse_vd"] = gaps
        measured = [g["gap_points"] for g in gaps if g["gap_points"] is not None]
        summary["target_met"] = bool(measured) and min(measured) >= 1.5 and len(measured) == len(gaps)
    if args.throughput_trials:
        summary["throughput"] = [throughput(w, base, out, args.throughput_trials) for w in (1, 2)]
    summary["total_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(results, Path(args.png))
    for r in results:
        print(f"{r['method']:>10}: {r['trials']} trials ({r['failed']} failed) in {r['seconds']:.0f} s, "
              f"hypervolume {r['hypervolume']:.2f}, front "
              + ", ".join(f"{c:.1f}x/{a:.2f}%" for c, a in r["front"]))
    for g in summary.get("vs_minus_sparse_vd", []):
        print(f"  at {g['compression']:.1f}x: Sparse VD {g['sparse_vd_accuracy']:.2f}%, VS "
              f"{'-' if g['vs_accuracy'] is None else format(g['vs_accuracy'], '.2f')}%")
    for t in summary.get("throughput", []):
        print(f"{t['workers']} worker(s): {t['trials']} trials in {t['seconds']:.0f} s = "
              f"{t['trials_per_hour']:.0f} trials/hour")
    print(f"total {summary['total_seconds']:.0f} s -> {out / 'summary.json'}, {args.png}")


if __name__ == "__main__":
    main()
