"""Reproduce the paper's experiments: one command per experiment, a table next to the published numbers, plots.

Each experiment is a file in benchmarks/experiments/: a params.yaml fragment, a "quick" budget that fits 2 CPU
cores and the published "full" budget, the methods compared (each a set of overrides), the datasets (optional)
and the anchors. Every row runs the library's own stage functions (teacher / distill / prune / evaluate), so
the numbers are what `varstudent run` produces with the effective params file saved next to each row.

    python benchmarks/reproduce.py --list
    python benchmarks/reproduce.py mnist-mlp                     # quick form
    python benchmarks/reproduce.py mnist-mlp --full              # 200 epochs
    python benchmarks/reproduce.py mnist-mlp --only vs_bsr --variant vd3:distill.vd_weight=3 --reuse-teacher
    python benchmarks/reproduce.py mnist-mlp --full --reuse-teacher --reuse-students  # students from a GPU

`--reuse-students` takes students that benchmarks/gpu_students.py trained on a lent GPU (after checking they
were trained with the row's settings and teacher) and runs prune / evaluate / exports here, on the CPU.

Outputs (default benchmarks/out/<experiment>-<form>/): results.md (tables + anchors + targets), results.json,
accuracy_vs_compression.png, sparsity_per_layer.png, kept_inputs.png (MNIST), and one folder per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from varstudent import stages
from varstudent.config import Params, load_params
from varstudent.evaluate import markdown_table
from varstudent.fileio import atomic_write_bytes, write_json

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
# every row: no MLflow, no progress bars, fewer latency repeats (the bench is about accuracy and size)
BENCH_SETS = ["tracking.enabled=false", "runtime.progress=false", "evaluate.latency_repeats=10"]


@dataclasses.dataclass
class Experiment:
    name: str
    description: str
    params: dict[str, Any]
    quick: list[str]
    full: list[str]
    methods: dict[str, list[str] | str]
    datasets: dict[str, list[str]]
    anchors: list[dict[str, Any]]
    targets: list[dict[str, Any]]


def load_experiment(name: str) -> Experiment:
    path = EXPERIMENTS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
        sys.exit(f"error: no experiment '{name}' (known: {known})")
    raw = yaml.safe_load(path.read_text())
    return Experiment(name=name, description=raw["description"], params=raw.get("params") or {},
                      quick=raw.get("quick") or [], full=raw.get("full") or [], methods=raw["methods"],
                      datasets=raw.get("datasets") or {"": []}, anchors=raw.get("anchors") or [],
                      targets=raw.get("targets") or [])


def effective_params(exp: Experiment, sets: list[str], out: Path) -> Params:
    """Validate the experiment's params with `sets` applied and save them as a params file in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=out) as fragment:  # private: runs may share `out`
        fragment.write(yaml.safe_dump(exp.params, sort_keys=False))
        fragment.flush()
        params = load_params(fragment.name, sets)
    save_params(params, out / "params.yaml")
    return params


def save_params(params: Params, path: Path) -> None:
    """A params file `varstudent run --params` (and `--reuse-students`' check) reads back."""
    atomic_write_bytes(path, params.to_yaml().encode())


def _teacher_row(teacher_dir: Path, label: str) -> dict[str, Any]:
    m = json.loads((teacher_dir / "metrics.json").read_text())
    return {"method": label, "error %": 100 * (1 - m["teacher_accuracy"]), "weights": m["teacher_weights"],
            "nonzero": m["teacher_weights"], "bytes": (teacher_dir / "teacher.safetensors").stat().st_size,
            "seconds": m["train_seconds"], "epochs": m["epochs_run"]}


# the settings a trained student depends on; a reused one must have been trained with these
TRAINING_SECTIONS = ("seed", "data", "student", "distill")


def reused_student(p: Params, distill_dir: Path, teacher_dir: Path) -> dict[str, Any] | None:
    """The metrics of a student trained elsewhere (gpu_students.py) with these settings, None if there is none."""
    if not (distill_dir / "metrics.json").is_file() or not (distill_dir / "params.yaml").is_file():
        return None  # none there, or one whose settings were not recorded: train afresh
    trained = yaml.safe_load((distill_dir / "params.yaml").read_text())
    wanted = p.to_dict()
    differ = [k for k in TRAINING_SECTIONS if trained.get(k) != wanted[k]]
    teacher_sha = json.loads((teacher_dir / "teacher.json").read_text())["sha256"]
    student_meta = json.loads((distill_dir / "student.json").read_text()).get("meta", {})
    if differ or student_meta.get("teacher_sha256") != teacher_sha:
        raise SystemExit(f"{distill_dir}: the student there was trained with other settings "
                         f"({', '.join(differ) or 'another teacher'}); delete it or drop --reuse-students")
    return json.loads((distill_dir / "metrics.json").read_text())


def run_dataset(exp: Experiment, label: str, sets: list[str], out: Path, reuse: bool,
                reuse_students: bool = False) -> list[dict[str, Any]]:
    """Prepare the data, train the teacher once, then one row per method."""
    base = effective_params(exp, sets, out)
    data_dir, teacher_dir = out / "prepare", out / "teacher"
    if not (reuse and (data_dir / "manifest.json").is_file()):
        stages.prepare(base, data_dir)
    if not (reuse and (teacher_dir / "metrics.json").is_file()):
        stages.teacher(base, data_dir, teacher_dir)
    teacher = _teacher_row(teacher_dir, "teacher")
    rows = [{**teacher, "x vs teacher": 1.0, "dataset": label}]
    print(f"[{label or exp.name}] teacher: {teacher['error %']:.2f}% error", flush=True)
    for method, overrides in exp.methods.items():
        run_dir = out / method
        if overrides == "dense":  # the student network trained with plain CE, the teacher's budget: the 1x reference
            dense = dataclasses.replace(base, teacher=dataclasses.replace(
                base.teacher, arch=base.student.arch, width=base.student.width, dropout=0.0, input_dropout=0.0,
                shift=0))
            if not (reuse and (run_dir / "metrics.json").is_file()):
                stages.teacher(dense, data_dir, run_dir)
            row = _teacher_row(run_dir, method)
            row.update({"x vs student": 1.0, "x vs teacher": teacher["weights"] / row["weights"]})
        else:
            p = effective_params(exp, [*sets, *overrides], run_dir)
            dist = reused_student(p, run_dir / "distill", teacher_dir) if reuse_students else None
            if dist is None:
                dist = stages.distill(p, data_dir, teacher_dir, run_dir / "distill")
                save_params(p, run_dir / "distill" / "params.yaml")  # lets --reuse-students take it later
            else:
                print(f"[{label or exp.name}] {method}: student reused from {run_dir / 'distill'} "
                      f"({dist['epochs_run']} epochs, {dist['train_seconds']:.0f} s)", flush=True)
            stages.prune(p, data_dir, run_dir / "distill", run_dir / "prune")
            ev = stages.evaluate(p, data_dir, teacher_dir, run_dir / "distill", run_dir / "prune",
                                 run_dir / "evaluate")
            layers = json.loads((run_dir / "evaluate" / "layers.json").read_text())
            row = {"method": method, "error %": 100 * (1 - ev["compact_accuracy"]),
                   "weights": ev["student_weights"], "nonzero": ev["nonzero_weights"],
                   "x vs student": ev["compression_vs_student"], "x vs teacher": ev["compression_vs_teacher"],
                   "bytes": ev["compact_bytes"],
                   "smallest export bytes": min(v for k, v in ev.items()
                                                if k.startswith("export_") and k.endswith("_disk_bytes")),
                   "latency ms b1": ev["export_compact_latency_ms_b1_median"],
                   "seconds": dist["train_seconds"], "epochs": dist["epochs_run"],
                   "sparsity % per layer": "-".join(f"{r['sparsity_pct']:.1f}" for r in layers),
                   "settings": " ".join(overrides)}
            row["footprint x vs teacher"] = teacher["bytes"] / row["smallest export bytes"]
        row["dataset"] = label
        rows.append(row)
        print(f"[{label or exp.name}] {method}: {row['error %']:.2f}% error at {row['x vs student']:.1f}x",
              flush=True)
    return rows


def check_targets(exp: Experiment, rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: met or missed, and by how much."""
    lines = []
    for t in exp.targets:
        cand = [r for r in rows if r["method"] == t["method"] and r["dataset"] == t.get("dataset", r["dataset"])]
        if not cand:
            lines.append(f"- {t['method']}: not run")
            continue
        for r in cand:
            where = f" on {r['dataset']}" if r["dataset"] else ""
            if "versus" in t:
                other = [o for o in rows if o["method"] == t["versus"] and o["dataset"] == r["dataset"]]
                if not other:
                    continue
                gain = other[0]["error %"] - r["error %"]
                # one point per method: the gain counts only if VS is at least as compressed as the other
                verdict = ("inconclusive: it is less compressed" if r["x vs student"] < other[0]["x vs student"]
                           else "met" if gain >= t["min_accuracy_gain_points"] else "missed")
                lines.append(f"- {t['method']} vs {t['versus']}{where}: {gain:+.2f} accuracy points at "
                             f"{r['x vs student']:.1f}x vs {other[0]['x vs student']:.1f}x (target "
                             f">= +{t['min_accuracy_gain_points']} at equal or higher compression): {verdict}")
                continue
            checks = [(r["error %"] <= t["max_error"], f"error {r['error %']:.2f}% (<= {t['max_error']}%)"),
                      (r["x vs student"] >= t["min_compression"],
                       f"{r['x vs student']:.1f}x vs dense student (>= {t['min_compression']}x)")]
            if "min_footprint_vs_teacher" in t:
                checks.append((r["footprint x vs teacher"] >= t["min_footprint_vs_teacher"],
                               f"footprint {r['footprint x vs teacher']:.0f}x below the teacher "
                               f"(>= {t['min_footprint_vs_teacher']}x)"))
            verdict = "met" if all(ok for ok, _ in checks) else "missed"
            lines.append(f"- {t['method']}{where}: " + "; ".join(
                f"{text} {'ok' if ok else 'MISSED'}" for ok, text in checks) + f" -> {verdict}")
    return lines


def save_plots(exp: Experiment, rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        if row.get("x vs student") in (None, ""):
            continue
        ax.scatter(row["x vs student"], 100 - row["error %"], s=40)
        ax.annotate(f"{row['method']} {row['dataset']}".strip(), (row["x vs student"], 100 - row["error %"]),
                    fontsize=7, xytext=(4, 2), textcoords="offset points")
    for a in exp.anchors:
        if "error" in a and "compression" in a:
            ax.scatter(a["compression"], 100 - a["error"], marker="x", color="black")
            ax.annotate(a["source"], (a["compression"], 100 - a["error"]), fontsize=6, color="gray",
                        xytext=(4, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("compression vs the dense student (weights / nonzero), log scale")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{exp.name}: accuracy vs compression (x = published)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_compression.png", dpi=100)
    plt.close(fig)
    made.append("accuracy_vs_compression.png")

    sparse_rows = [r for r in rows if r.get("sparsity % per layer")]
    if sparse_rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(sparse_rows)
        layers = 0
        for i, row in enumerate(sparse_rows):
            values = [float(v) for v in row["sparsity % per layer"].split("-")]
            layers = max(layers, len(values))
            ax.bar([j + i * width for j in range(len(values))], values, width,
                   label=f"{row['method']} {row['dataset']}".strip())
        ax.set_xticks([j + 0.4 - width / 2 for j in range(layers)], [str(j) for j in range(layers)])
        ax.set_xlabel("layer (variational layers in order)")
        ax.set_ylabel("weights removed %")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
        ax.set_title(f"{exp.name}: sparsity per layer")
        fig.tight_layout()
        fig.savefig(out / "sparsity_per_layer.png", dpi=100)
        plt.close(fig)
        made.append("sparsity_per_layer.png")
    # the kept-input mask of the last VS row, as evaluate drew it (MLP students on MNIST-like data)
    for row in reversed(sparse_rows):
        mask = out / row["dataset"] / row["method"] / "evaluate" / "kept_inputs.png"
        if mask.is_file():
            shutil.copyfile(mask, out / "kept_inputs.png")
            made.append("kept_inputs.png")
            break
    return made


def run_experiment(exp: Experiment, form: str, out: Path, extra: list[str], reuse: bool,
                   reuse_students: bool = False) -> list[dict[str, Any]]:
    started = time.perf_counter()
    budget = exp.full if form == "full" else exp.quick
    rows: list[dict[str, Any]] = []
    for label, data_sets in exp.datasets.items():
        rows += run_dataset(exp, label, [*BENCH_SETS, *budget, *data_sets, *extra], out / label, reuse,
                            reuse_students)
    seconds = time.perf_counter() - started
    columns = ["dataset", "method", "error %", "nonzero", "x vs student", "x vs teacher", "bytes",
               "smallest export bytes", "footprint x vs teacher", "latency ms b1", "sparsity % per layer",
               "epochs", "seconds"]
    if len(exp.datasets) == 1:
        columns.remove("dataset")
    anchors = markdown_table(exp.anchors, ["source", "error", "compression", "compression_vs_teacher"])
    targets = check_targets(exp, rows)
    plots = save_plots(exp, rows, out)
    text = "\n".join([
        f"# {exp.name} ({form} form)", "", exp.description, "",
        f"Budget: {' '.join(budget)}; extra: {' '.join(extra) or 'none'}; total {seconds:.0f} s wall.",
        "Command: `python " + " ".join(sys.argv) + "`", "",
        "## Measured", "", markdown_table(rows, columns), "",
        "error % is the compact (pruned, physically shrunk) student's test error; x vs student = dense student "
        "weights / nonzero weights; footprint = teacher's weight file / the smallest export's files.", "",
        "## Published", "", anchors, "", "## Targets", "", *targets, "",
        *[f"![{p}]({p})" for p in plots], ""])
    (out / "results.md").write_text(text)
    write_json(out / "results.json", {"experiment": exp.name, "form": form, "seconds": seconds, "rows": rows,
                                      "targets": targets})
    print(f"\n{markdown_table(rows, columns)}\n" + "\n".join(targets) + f"\n{out / 'results.md'} ({seconds:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", nargs="?")
    parser.add_argument("--list", action="store_true", help="list the experiments")
    parser.add_argument("--full", action="store_true", help="the published budget instead of the quick one")
    parser.add_argument("--out", help="output folder (default benchmarks/out/<experiment>-<form>)")
    parser.add_argument("--set", action="append", default=[], help="override for every row (repeatable)")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all); none = only the variants")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:key=v,key=v - an extra row: the experiment's params with these overrides")
    parser.add_argument("--datasets", nargs="*", help="datasets to run (default: all of the experiment's)")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="keep prepared data, teachers and dense students already in the output folder")
    parser.add_argument("--reuse-students", action="store_true",
                        help="keep students already trained in ROW/distill (e.g. on a GPU by gpu_students.py), "
                             "after checking they were trained with the same settings and teacher")
    args = parser.parse_args(argv)
    if args.list or not args.experiment:
        for path in sorted(EXPERIMENTS.glob("*.yaml")):
            print(f"{path.stem:14s} {yaml.safe_load(path.read_text())['description']}")
        return
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    exp = load_experiment(args.experiment)
    if args.only is not None:
        exp.methods = {m: exp.methods[m] for m in args.only}
    for text in args.variant:
        name, _, sets = text.partition(":")
        exp.methods[name] = [s for s in sets.split(",") if s]
    if args.datasets:
        exp.datasets = {d: exp.datasets[d] for d in args.datasets}
    form = "full" if args.full else "quick"
    run_experiment(exp, form, Path(args.out or f"benchmarks/out/{exp.name}-{form}"), args.set, args.reuse_teacher,
                   args.reuse_students)


if __name__ == "__main__":
    main()
