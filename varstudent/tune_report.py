"""The study's report: the Pareto front as a PNG (matplotlib) and an interactive HTML page (plotly), the
front as a markdown table, every trial as CSV. Reads plain trial rows (varstudent.tune.trial_rows)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from varstudent.config import TUNABLE
from varstudent.evaluate import markdown_table
from varstudent.fileio import atomic_write, atomic_write_bytes

COLUMNS = ["number", "state", "val_accuracy", "compression", *TUNABLE, "nonzero_weights", "epochs_run",
           "seconds", "worker", "fail_reason"]


def _percent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "val_accuracy": 100 * r["val_accuracy"]} for r in rows]


def front_table(rows: list[dict[str, Any]], front: list[int]) -> str:
    by_number = {r["number"]: r for r in rows}
    shown = _percent([by_number[n] for n in front])
    columns = ["number", "val_accuracy", "compression", *TUNABLE, "nonzero_weights", "epochs_run"]
    return markdown_table(shown, columns).replace("val_accuracy", "val_accuracy %")


def _completed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["state"] == "COMPLETE"]


def save_png(rows: list[dict[str, Any]], front: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _completed(rows)
    pareto = sorted((r for r in done if r["number"] in front), key=lambda r: r["compression"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([r["compression"] for r in done], [100 * r["val_accuracy"] for r in done], s=18, c="0.65",
               label=f"trials ({len(done)} complete)")
    ax.plot([r["compression"] for r in pareto], [100 * r["val_accuracy"] for r in pareto], "o-", c="C3",
            drawstyle="steps-pre", label=f"Pareto front ({len(pareto)})")
    for r in pareto:
        ax.annotate(str(r["number"]), (r["compression"], 100 * r["val_accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("compression (dense student weights / nonzero weights)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def save_html(rows: list[dict[str, Any]], front: list[int], path: Path, title: str) -> None:
    """Self-contained (plotly.js inlined) so it opens offline; hover shows each trial's settings."""
    import plotly.graph_objects as go

    def hover(r: dict[str, Any]) -> str:
        settings = "<br>".join(f"{k} = {r[k]:.4g}" if isinstance(r[k], float) else f"{k} = {r[k]}"
                               for k in TUNABLE)
        return f"trial {r['number']}<br>{settings}"

    fig = go.Figure()
    for name, group, style in (("trials", [r for r in _completed(rows) if r["number"] not in front],
                                dict(color="lightgray", size=8)),
                               ("Pareto front", sorted((r for r in _completed(rows) if r["number"] in front),
                                                       key=lambda r: r["compression"]),
                                dict(color="crimson", size=10))):
        fig.add_trace(go.Scatter(x=[r["compression"] for r in group], y=[100 * r["val_accuracy"] for r in group],
                                 mode="markers" if name == "trials" else "lines+markers", name=name,
                                 marker=style, text=[hover(r) for r in group], hoverinfo="text+x+y",
                                 line=dict(shape="vh")))
    fig.update_layout(title=title, xaxis=dict(title="compression", type="log"),
                      yaxis=dict(title="validation accuracy %"), template="plotly_white")
    html = fig.to_html(include_plotlyjs=True, full_html=True)
    atomic_write_bytes(path, html.encode())


def trials_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_report(rows: list[dict[str, Any]], front: list[int], out_dir: Path, title: str) -> list[Path]:
    """pareto.png, pareto.html, pareto.md (the front and the counts), pareto.csv (the front's trials) and
    trials.csv (every trial)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    failed = [r for r in rows if r["state"] == "FAIL"]
    lines = [f"# {title}", "", "Objectives: validation accuracy (a stratified share of the training data) "
             "and compression (dense student weights / nonzero weights), both maximized.", "",
             "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())), "",
             "## Pareto front", "", front_table(rows, front) if front else "(no completed trial)", ""]
    if failed:
        lines += ["## Failed trials", "", markdown_table(failed, ["number", "worker", "fail_reason"]), ""]
    paths = {name: out_dir / name for name in ("pareto.png", "pareto.html", "pareto.md", "pareto.csv",
                                                "trials.csv")}
    save_png(rows, front, paths["pareto.png"], title)
    save_html(rows, front, paths["pareto.html"], title)
    atomic_write_bytes(paths["pareto.md"], "\n".join(lines).encode())
    by_number = {r["number"]: r for r in rows}
    atomic_write_bytes(paths["pareto.csv"], trials_csv([by_number[n] for n in front]).encode())
    atomic_write_bytes(paths["trials.csv"], trials_csv(rows).encode())
    return list(paths.values())
