"""Bytes and CPU speed of the teacher, the dense (masked) student and every export of a finished run.

Runs the evaluate stage's own measurement (varstudent.evaluate.measure_speeds) with more repeats, into a
separate folder, and prints the table and the targets of the inference issue:
compact throughput at batch 256 >= 20x the teacher's and >= 2x the dense student's; bytes on disk >= 500x
below the teacher's float32 weights; the sparse path's per-layer choice and by how much CSR loses or wins.

    python benchmarks/exports.py                        # artifacts/ of `varstudent run`
    python benchmarks/exports.py --artifacts /tmp/x/artifacts --threads 1 --repeats 200
    python benchmarks/exports.py --rounds 5      # the whole measurement 5 times: median and range per row

Throughput on a shared 2-core machine moves by 10-30 % between runs of the same command (the teacher's batch-256
rate read 46,223 and 43,216 samples/s an hour apart), so a ratio near a target is judged on the median of
several rounds, with the range shown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from varstudent import stages
from varstudent.config import load_params

TARGETS = {"speedup_vs_teacher_b256": 20.0, "speedup_vs_student_b256": 2.0, "size_vs_teacher": 500.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per model and batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement; report medians")
    args = parser.parse_args()
    root = args.artifacts
    out = args.out or Path(tempfile.mkdtemp(prefix="varstudent-exports-"))
    params = load_params(None, [f"evaluate.latency_repeats={args.repeats}", f"evaluate.latency_warmup={args.warmup}",
                                f"evaluate.threads={args.threads}", "tracking.enabled=false"])
    rounds = []
    for i in range(args.rounds):
        folder = out / f"round-{i + 1}" if args.rounds > 1 else out
        stages.evaluate(params, root / "prepare", root / "teacher", root / "distill", root / "prune", folder)
        rounds.append(json.loads((folder / "exports.json").read_text()))
    rows, metrics = median_rows(rounds)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available; "
          f"measured with {rows[0]['threads']} threads, {args.repeats} repeats after {args.warmup} warm-up runs")
    if args.rounds > 1:
        print(f"{args.rounds} rounds: each speed below is the median over rounds, [min - max] the range")
    print(f"{'model':<18}{'bytes':>11}{'params':>11}{'nonzeros':>10}{'acc %':>8}{'b1 med ms':>11}{'b1 p95 ms':>11}"
          f"{'samples/s b256':>16}{'   range':<22}")
    for row in rows:
        print(f"{row['model']:<18}{row['bytes']:>11,}{row['params']:>11,}{row['nonzeros']:>10,}"
              f"{100 * row['accuracy']:>8.2f}{row['latency_ms_b1_median']:>11.4f}{row['latency_ms_b1_p95']:>11.4f}"
              f"{row['samples_per_s_b256']:>16,.0f}   [{row['b256_min']:,.0f} - {row['b256_max']:,.0f}]")
    print("\ntargets (teacher bytes = its float32 weights file, export bytes = all its files):")
    for row in rows[2:]:
        key = row["key"]
        checks = []
        for name, goal in TARGETS.items():
            values = metrics[f"{key}_{name}"]
            value = statistics.median(values)
            spread = f" [{min(values):.1f} - {max(values):.1f}]" if len(values) > 1 else ""
            checks.append(f"{name.removesuffix('_b256').replace('_vs_', ' vs ')} {value:.1f}x{spread} "
                          f"(>= {goal:g}x: {'met' if value >= goal else 'NOT met'})")
        print(f"  {row['model']:<16} " + "; ".join(checks))
    sparse = root / "prune" / "sparse.json"
    if sparse.is_file():
        doc = json.loads(sparse.read_text())
        print(f"\nsparse export, per layer (timed at export with {doc['threads']} threads; rule: {doc['rule']}):")
        for i, c in enumerate(doc["choices"]):
            line = (f"  layer {i}: density {100 * c['nonzero'] / max(c['weights'], 1):.1f}%, stored {c['storage']} "
                    f"({c['csr_bytes']:,} B as CSR, {c['dense_bytes']:,} B dense), runs {c['execution']}")
            if c["ms"]:
                ms = c["ms"]
                line += (f"; CSR / dense time: {ms['csr']['b256'] / ms['dense']['b256']:.2f}x at batch 256, "
                         f"{ms['csr']['b1'] / ms['dense']['b1']:.2f}x at batch 1")
            print(line)
    print(f"\nreport: {out / 'report.md'}")


def median_rows(rounds: list[list[dict]]) -> tuple[list[dict], dict[str, list[float]]]:
    """Per model, the median of each latency / throughput over rounds (and the b256 range); per target ratio,
    its value in every round (each round's ratio divides that round's own teacher measurement)."""
    from varstudent.evaluate import flat_metrics

    speed_keys = ("latency_ms_b1_median", "latency_ms_b1_p95", "samples_per_s_b256")
    rows = []
    for per_round in zip(*rounds):
        row = dict(per_round[0])
        for key in speed_keys:
            row[key] = statistics.median(r[key] for r in per_round)
        row["b256_min"] = min(r["samples_per_s_b256"] for r in per_round)
        row["b256_max"] = max(r["samples_per_s_b256"] for r in per_round)
        rows.append(row)
    ratios: dict[str, list[float]] = {}
    for per_round in rounds:
        for key, value in flat_metrics(per_round).items():
            ratios.setdefault(key, []).append(value)
    return rows, ratios


if __name__ == "__main__":
    main()
