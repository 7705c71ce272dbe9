"""Accuracy vs compression of the rows of one or more `reproduce.py` runs, one colour per method family, each
family's Pareto front drawn as a step line: the picture of "who wins at equal compression".

    python benchmarks/front_plot.py docs/img/results/low-data-mnist5k_fronts.png \
        benchmarks/out/a/results.json benchmarks/out/b/results.json \
        --family "Sparse VD=^(sparse_vd|svd)" --family "VS=^vs" --title "MNIST-5k, 60 epochs"

A folder instead of a results.json stands for every row evaluated in it (ROW/evaluate/metrics.json, at any
depth): several `reproduce.py --reuse-teacher` runs into one folder each rewrite results.json with their own
rows only.

`--versus LABEL` prints, for every row of the other families, its accuracy minus LABEL's front at the same
compression: the front's accuracy interpolated linearly in log compression between the two front points around
it. The plot's steps compare against the less compressed neighbour, which flatters the front; comparing against
the more compressed one flatters the row; the straight line is the middle. Rows outside the front's compression
range get no number: that would be an extrapolation.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (compression, accuracy) points no other point beats on both, by increasing compression."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)]
    return sorted(set(front))


def front_accuracy_at(front: list[tuple[float, float]], compression: float) -> float | None:
    """The front's accuracy at `compression`, linear in log compression between its two neighbouring points;
    None outside the front's range."""
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= compression <= x1:
            return y0 + (y1 - y0) * (math.log(compression) - math.log(x0)) / (math.log(x1) - math.log(x0))
    if front and compression == front[0][0]:  # a front of one point
        return front[0][1]
    return None


def rows_of(path: Path) -> list[dict]:
    """The rows of a results.json, or of every ROW/evaluate/metrics.json under a folder (the same keys)."""
    if path.is_file():
        return json.loads(path.read_text())["rows"]
    rows = []
    for metrics_file in sorted(path.rglob("evaluate/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        rows.append({"method": metrics_file.parent.parent.name, "x vs student": metrics["compression_vs_student"],
                     "error %": 100 * (1 - metrics["compact_accuracy"])})
    if not rows:
        raise SystemExit(f"front_plot: no results.json and no */evaluate/metrics.json under {path}")
    return rows


def save_figure(fig, ax, png: Path) -> None:
    """Legend, layout, PNG at 100 dpi (its folder made), and its path printed."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    print(png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png", type=Path)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files of reproduce.py")
    parser.add_argument("--family", action="append", required=True,
                        help="LABEL=REGEX on the method name (split at the last =)")
    parser.add_argument("--title", default="")
    parser.add_argument("--versus", metavar="LABEL",
                        help="print every other row's accuracy gain over this family's front at equal compression")
    args = parser.parse_args()
    families = [(label, re.compile(pattern)) for label, _, pattern in (f.rpartition("=") for f in args.family)]
    points: dict[str, list[tuple[float, float, str]]] = {label: [] for label, _ in families}
    for path in args.results:
        for row in rows_of(path):
            label = next((lab for lab, rx in families if rx.search(row["method"])), None)
            if label and row.get("x vs student"):
                points[label].append((row["x vs student"], 100 - row["error %"], row["method"]))

    if args.versus:
        if args.versus not in points:
            raise SystemExit(f"front_plot: --versus {args.versus!r} is not one of the families {list(points)}")
        reference = pareto([(x, y) for x, y, _ in points[args.versus]])
        for label, rows in points.items():
            for x, y, name in sorted(rows) if label != args.versus else []:
                at = front_accuracy_at(reference, x)
                gain = "outside its range" if at is None else f"{y - at:+.2f} points (front {at:.2f} %)"
                print(f"{name}: {y:.2f} % at {x:.1f}x; vs the {args.versus} front at {x:.1f}x: {gain}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, rows), colour in zip(points.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        if not rows:
            continue
        ax.scatter([r[0] for r in rows], [r[1] for r in rows], color=colour, s=30, label=label)
        for x, y, name in rows:
            ax.annotate(name, (x, y), fontsize=6, color="gray", xytext=(3, 3), textcoords="offset points")
        front = pareto([(x, y) for x, y, _ in rows])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=colour, alpha=0.6)
        print(f"{label} front: " + ", ".join(f"{x:.0f}x {y:.1f}%" for x, y in front))
    ax.set_xscale("log")
    ax.set_xlabel("compression vs the dense student (weights / nonzero), log scale")
    ax.set_ylabel("test accuracy %")
    ax.set_title(args.title or "accuracy vs compression")
    ax.grid(alpha=0.3)
    save_figure(fig, ax, args.png)


if __name__ == "__main__":
    main()
