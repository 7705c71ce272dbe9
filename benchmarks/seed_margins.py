"""How far one family of rows lies above another family's front, seed by seed: is a margin a property of the
settings or of one split and one teacher?

    python benchmarks/seed_margins.py docs/img/results/low-data-mnist5k_seeds.png \
        --seed 0=benchmarks/out/s0 --seed 1=benchmarks/out/s1 --seed 2=benchmarks/out/s2 \
        --reference "^bs50_svd" --rows "^bs50_kd" --target 1.5

Each `--seed S=DIR[,DIR…]` names the folders of one seed's `reproduce.py` rows (every ROW/evaluate/metrics.json
under them, as `front_plot.py` reads them). Within each seed, every row matching `--rows` gets its accuracy minus
that seed's `--reference` front at the same compression (linear in log compression between the front's two
neighbouring points; no number outside the front's range). Printed (markdown): each setting's margin per seed,
their mean and standard deviation; the best row's margin per seed (the front-to-front reading of a target such
as "≥ 1.5 points at equal compression") with its mean; and the same comparison between the seeds' averages
(each setting's mean accuracy at the geometric mean of its compressions). The plot: every margin, one column
per setting.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_plot import front_accuracy_at, pareto, rows_of, save_figure  # noqa: E402


def seed_points(folders: list[Path]) -> dict[str, tuple[float, float]]:
    """row name -> (compression vs the dense student, accuracy %) over the seed's folders."""
    points: dict[str, tuple[float, float]] = {}
    for folder in folders:
        for row in rows_of(folder):
            if row["method"] in points:
                raise SystemExit(f"seed_margins: row {row['method']!r} appears twice among {folders}")
            points[row["method"]] = (row["x vs student"], 100 - row["error %"])
    return points


def margins(points: dict[str, tuple[float, float]], reference: re.Pattern,
            rows: re.Pattern) -> dict[str, float | None]:
    """Each --rows row's accuracy minus the --reference front at its compression (None outside the range)."""
    front = pareto([p for name, p in points.items() if reference.search(name)])
    if not front:
        raise SystemExit(f"seed_margins: no row matches --reference {reference.pattern!r}")
    out: dict[str, float | None] = {}
    for name, (x, y) in points.items():
        if rows.search(name):
            at = front_accuracy_at(front, x)
            out[name] = None if at is None else y - at
    return out


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png", type=Path)
    parser.add_argument("--seed", action="append", required=True, metavar="S=DIR[,DIR]")
    parser.add_argument("--reference", required=True, help="regex of the rows whose front is the reference")
    parser.add_argument("--rows", required=True, help="regex of the rows compared with it")
    parser.add_argument("--target", type=float, default=None, help="a margin to draw and count against")
    parser.add_argument("--title", default="")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args()
    reference, rows = re.compile(args.reference), re.compile(args.rows)

    seeds: dict[str, dict[str, tuple[float, float]]] = {}
    for item in args.seed:
        label, sep, dirs = item.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"seed_margins: --seed wants S=DIR[,DIR], got {item!r}")
        seeds[label] = seed_points([Path(d) for d in dirs.split(",")])
    per_seed = {s: margins(points, reference, rows) for s, points in seeds.items()}
    settings = sorted({name for m in per_seed.values() for name in m},
                      key=lambda n: statistics.mean(seeds[s][n][0] for s in seeds if n in seeds[s]))

    print("| setting | " + " | ".join(f"seed {s}: error % at ×, margin" for s in seeds) + " | mean ± sd |")
    print("|---|" + "---|" * (len(seeds) + 1))
    for name in settings:
        cells = []
        for s in seeds:
            if name in seeds[s]:
                x, y = seeds[s][name]
                cells.append(f"{100 - y:.1f} at {x:.0f}×, {fmt(per_seed[s][name])}")
            else:
                cells.append("not run")
        values = [v for s in seeds if (v := per_seed[s].get(name)) is not None]
        print(f"| {name} | " + " | ".join(cells) + f" | {mean_sd(values)} |")
    best = {s: max((v for v in m.values() if v is not None), default=None) for s, m in per_seed.items()}
    best_values = [v for v in best.values() if v is not None]
    print("| best row of the seed | " + " | ".join(fmt(best[s]) for s in seeds) + f" | {mean_sd(best_values)} |")

    # the seeds' averages of the settings run on every seed: compression's geometric mean (fronts are compared in
    # log compression), accuracy's arithmetic mean
    common = [n for n in {n for p in seeds.values() for n in p} if all(n in p for p in seeds.values())]
    averaged = {n: (statistics.geometric_mean(p[n][0] for p in seeds.values()),
                    statistics.mean(p[n][1] for p in seeds.values())) for n in common}
    averaged_margins = margins(averaged, reference, rows)
    print("\nAveraged over the seeds (settings run on every seed):")
    for name, value in sorted(averaged_margins.items(), key=lambda kv: averaged[kv[0]][0]):
        x, y = averaged[name]
        print(f"- {name}: {100 - y:.2f} % at {x:.1f}×, vs the averaged reference front: {fmt(value)}")
    if args.target is not None:
        hits = sum(v >= args.target for v in best_values)
        print(f"\nTarget {args.target:+.2f}: the best row reaches it on {hits} of {len(best_values)} seeds.")

    if args.json:
        args.json.write_text(json.dumps({"seeds": {s: {n: list(p) for n, p in pts.items()} for s, pts in seeds.items()},
                                         "margins": per_seed, "best": best,
                                         "averaged": {n: list(p) for n, p in averaged.items()},
                                         "averaged_margins": averaged_margins}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (s, m) in enumerate(per_seed.items()):
        xs = [k + (i - (len(per_seed) - 1) / 2) * 0.08 for k, n in enumerate(settings) if m.get(n) is not None]
        ys = [m[n] for n in settings if m.get(n) is not None]
        ax.scatter(xs, ys, color=colours[i % len(colours)], s=28, label=f"seed {s}")
    for k, name in enumerate(settings):
        values = [v for m in per_seed.values() if (v := m.get(name)) is not None]
        if values:
            ax.plot([k - 0.3, k + 0.3], [statistics.mean(values)] * 2, color="black", lw=2)
    ax.axhline(0, color="gray", lw=1)
    if args.target is not None:
        ax.axhline(args.target, color="red", ls="--", lw=1, label=f"target {args.target:+g}")
    ax.set_xticks(range(len(settings)), settings, rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("accuracy points above the reference front\nat equal compression")
    ax.set_title(args.title or "margin over the reference front, per seed (black: mean)")
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, ax, args.png)


if __name__ == "__main__":
    main()
