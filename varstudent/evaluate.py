"""Measurements and the human-readable report: throughput, the summary table, report.md and plots."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPEED_ROUNDS = 5  # timed runs of all models interleaved in rounds: a drift in the machine's speed hits all alike
BATCHES = (1, 256)


@torch.no_grad()
def measure_speeds(models: list[nn.Module], sample: torch.Tensor, repeats: int, warmup: int,
                   threads: int = 0) -> list[dict[int, dict[str, float]]]:
    """Per model, per batch size in BATCHES: samples/s and median / p95 latency (ms) of one forward pass on the
    CPU. The PyTorch models are warmed up, then the `repeats` timed runs of each (model, batch) are spread over
    up to SPEED_ROUNDS rounds, each round timing every model in turn, so the ratios between models are not
    skewed by a shared machine slowing down while one of them is timed (single runs here moved by 10-30 %).
    A model with its own thread pool (`.threads`: onnxruntime) is timed alone afterwards: its threads keep
    spinning after each run and, interleaved, slowed the next PyTorch model (the MNIST teacher 46k -> 27k
    samples/s)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        models = [model.to("cpu").eval() for model in models]
        inputs = {b: sample.to("cpu").repeat(-(-b // sample.shape[0]), *([1] * (sample.dim() - 1)))[:b]
                  for b in BATCHES}
        own_pool = [i for i, model in enumerate(models) if getattr(model, "threads", None)]
        groups = [[i for i in range(len(models)) if i not in own_pool], *([i] for i in own_pool)]
        times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(models)) for b in BATCHES}
        for group in groups:
            _time_interleaved([models[i] for i in group], inputs, repeats, warmup,
                              [[times[(i, b)] for b in BATCHES] for i in group])
        return [{b: _speed(times[(i, b)], b, model) for b in BATCHES} for i, model in enumerate(models)]
    finally:
        torch.set_num_threads(previous)


def _time_interleaved(models: list[nn.Module], inputs: dict[int, torch.Tensor], repeats: int, warmup: int,
                      out: list[list[list[float]]]) -> None:
    """Warm every model up, then time `repeats` runs of each (model, batch) in rounds; out[model][batch] gets
    the seconds."""
    for model in models:
        for x in inputs.values():
            for _ in range(warmup):
                model(x)
    rounds = min(SPEED_ROUNDS, repeats)
    for r in range(rounds):
        share = repeats // rounds + (r < repeats % rounds)
        for model, model_out in zip(models, out):
            for x, batch_out in zip(inputs.values(), model_out):
                for _ in range(share):
                    start = time.perf_counter()
                    model(x)
                    batch_out.append(time.perf_counter() - start)


def _speed(times: list[float], batch: int, model: nn.Module) -> dict[str, float]:
    times = sorted(times)
    median = statistics.median(times)
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    # an onnxruntime model runs on its own thread pool, sized when it was loaded
    return {"samples_per_s": batch / median, "latency_ms_median": 1e3 * median, "latency_ms_p95": 1e3 * p95,
            "threads": getattr(model, "threads", None) or torch.get_num_threads()}


def measure_model(model: nn.Module, files: list[Path], x: torch.Tensor, y: torch.Tensor,
                  speed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """One row of the exports table: bytes of all its files, weights, nonzeros, accuracy, and its CPU `speed`
    (one entry of measure_speeds)."""
    from varstudent.export import weight_stats
    from varstudent.train import accuracy

    params, nonzeros = weight_stats(model)
    b1, b256 = speed[1], speed[256]
    return {"bytes": sum(p.stat().st_size for p in files), "params": params, "nonzeros": nonzeros,
            "accuracy": accuracy(model, x, y), "latency_ms_b1_median": b1["latency_ms_median"],
            "latency_ms_b1_p95": b1["latency_ms_p95"], "samples_per_s_b1": b1["samples_per_s"],
            "latency_ms_b256_median": b256["latency_ms_median"], "samples_per_s_b256": b256["samples_per_s"],
            "threads": b256["threads"], "speed": [{"batch": 1, **b1}, {"batch": 256, **b256}]}


def flat_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """metrics.json keys KEY_NAME for every row (teacher, student, export_FORMAT) and the ratios of the exports.

    The first two rows are the teacher (with `weights_bytes`, its float32 weights file) and the dense student.
    """
    teacher, student = rows[0], rows[1]
    metrics: dict[str, float] = {}
    for row in rows:
        key = row["key"]
        for name in ("params", "nonzeros", "latency_ms_b1_median", "latency_ms_b1_p95", "samples_per_s_b1",
                     "samples_per_s_b256"):
            metrics[f"{key}_{name}"] = row[name]
        metrics[f"{key}_disk_bytes"] = row["bytes"]  # all files of the model
        if key.startswith("export_"):
            metrics[f"{key}_accuracy"] = row["accuracy"]
            metrics[f"{key}_speedup_vs_teacher_b256"] = row["samples_per_s_b256"] / teacher["samples_per_s_b256"]
            metrics[f"{key}_speedup_vs_student_b256"] = row["samples_per_s_b256"] / student["samples_per_s_b256"]
            metrics[f"{key}_size_vs_teacher"] = teacher["weights_bytes"] / row["bytes"]
    return metrics


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_exports(rows: list[dict[str, Any]], sparse_choices: list[dict[str, Any]] | None) -> list[str]:
    """The exports section of report.md: one row per model, the target ratios, the sparse layer choices."""
    by_key = {row["key"]: row for row in rows}
    teacher, student = by_key["teacher"], by_key["student"]
    table = [{**row, "accuracy %": 100 * row["accuracy"], "b1 median ms": row["latency_ms_b1_median"],
              "b1 p95 ms": row["latency_ms_b1_p95"], "samples/s b256": row["samples_per_s_b256"]} for row in rows]
    parts = [f"## Exports ({rows[0]['threads']} CPU threads)", "",
             "Bytes: all files of the model on disk. Latency: one sample; throughput: batches of 256.", "",
             markdown_table(table, ["model", "bytes", "params", "nonzeros", "accuracy %", "b1 median ms",
                                    "b1 p95 ms", "samples/s b256"]), ""]
    for row in rows[2:]:
        speed = row["samples_per_s_b256"]
        parts.append(f"- {row['model']}: {speed / teacher['samples_per_s_b256']:.1f}x the teacher's throughput at "
                     f"batch 256, {speed / student['samples_per_s_b256']:.1f}x the dense (masked) student's; "
                     f"{teacher['weights_bytes'] / row['bytes']:.0f}x fewer bytes than the teacher's float32 weights")
    if sparse_choices:
        parts += ["", "Sparse export, per layer (times: one layer, median ms; rule: CSR where faster at batch 256):",
                  "", markdown_table([{"layer": i, "density %": 100 * c["nonzero"] / max(c["weights"], 1),
                                       "storage": c["storage"], "execution": c["execution"],
                                       "dense b256 ms": c["ms"]["dense"]["b256"] if c["ms"] else "",
                                       "csr b256 ms": c["ms"]["csr"]["b256"] if c["ms"] else "",
                                       "dense b1 ms": c["ms"]["dense"]["b1"] if c["ms"] else "",
                                       "csr b1 ms": c["ms"]["csr"]["b1"] if c["ms"] else ""}
                                      for i, c in enumerate(sparse_choices)],
                                     ["layer", "density %", "storage", "execution", "dense b256 ms", "csr b256 ms",
                                      "dense b1 ms", "csr b1 ms"])]
    return [*parts, ""]


def render_report(metrics: dict[str, Any], layers: list[dict[str, Any]], speed: list[dict[str, Any]],
                  plots: list[str], exports: list[dict[str, Any]] | None = None,
                  sparse_choices: list[dict[str, Any]] | None = None) -> str:
    m = metrics
    summary = [
        {"model": "teacher", "accuracy %": 100 * m["teacher_accuracy"], "weights": m["teacher_weights"],
         "nonzero": m["teacher_weights"], "bytes": m["teacher_bytes"]},
        {"model": "student (masked)", "accuracy %": 100 * m["student_accuracy"],
         "weights": m["student_weights"], "nonzero": m["student_nonzero_weights"], "bytes": ""},
        {"model": "compact student", "accuracy %": 100 * m["compact_accuracy"],
         "weights": m["compact_weights"], "nonzero": m["nonzero_weights"], "bytes": m["compact_bytes"]},
    ]
    parts = [
        "# varstudent evaluation report", "",
        f"Dataset `{m['dataset']}`, teacher `{m['teacher_arch']}`, student `{m['student_arch']}`, "
        f"log-alpha threshold {m['threshold']}.", "",
        markdown_table(summary, ["model", "accuracy %", "weights", "nonzero", "bytes"]), "",
        f"- Compression vs the dense student: **{m['compression_vs_student']:.1f}x** "
        f"(all student weights / nonzero weights of the compact student)",
        f"- Compression vs the teacher: **{m['compression_vs_teacher']:.1f}x**",
        f"- Bytes on disk: teacher {m['teacher_bytes']:,} B, compact student {m['compact_bytes']:,} B "
        f"({m['teacher_bytes'] / m['compact_bytes']:.1f}x smaller, float32 dense compact)", "",
        "## Sparsity per layer (masked student)", "",
        markdown_table(layers, ["layer", "kind", "shape", "compact_shape", "weights", "nonzero",
                                "sparsity_pct"]), "",
        f"## CPU throughput ({speed[0]['threads']} threads)", "",
        markdown_table(speed, ["model", "batch", "samples_per_s", "latency_ms_median", "latency_ms_p95"]),
        "",
    ]
    if exports:
        parts += render_exports(exports, sparse_choices)
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def save_plots(out_dir: Path, layers: list[dict[str, Any]], history: list[dict[str, float]],
               kept_inputs: torch.Tensor | None, input_shape: list[int],
               log_alphas: list[torch.Tensor] | None = None, threshold: float = 3.0) -> list[str]:
    """Per-layer sparsity bars, the training curves, the log alpha histograms and, for MLPs, the kept-input
    mask as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [f"{r['kind']} {r['layer']}\n{'x'.join(map(str, r['shape'][:2]))}" for r in layers]
    ax.bar(labels, [r["sparsity_pct"] for r in layers], color="#4c72b0")
    ax.set_ylabel("sparsity %")
    ax.set_ylim(0, 100)
    ax.set_title("Weights removed per layer")
    fig.tight_layout()
    fig.savefig(out_dir / "sparsity.png", dpi=100)
    plt.close(fig)
    names.append("sparsity.png")

    if history:
        fig, ax1 = plt.subplots(figsize=(6, 3))
        epochs = [h["epoch"] for h in history]
        ax1.plot(epochs, [h["loss"] for h in history], label="loss", color="#c44e52")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("training loss")
        ax2 = ax1.twinx()
        if "sparsity_pct" in history[0]:
            ax2.plot(epochs, [h["sparsity_pct"] for h in history], label="sparsity %", color="#4c72b0")
        if "test_accuracy" in history[0]:
            ax2.plot(epochs, [100 * h["test_accuracy"] for h in history], label="test acc %",
                     color="#55a868")
        ax2.set_ylim(0, 100)
        lines = ax1.get_lines() + ax2.get_lines()
        ax1.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
        ax1.set_title("Distillation")
        fig.tight_layout()
        fig.savefig(out_dir / "training.png", dpi=100)
        plt.close(fig)
        names.append("training.png")

    if log_alphas:
        fig, axes = plt.subplots(1, len(log_alphas), figsize=(2.6 * len(log_alphas), 2.6), squeeze=False)
        for i, (ax, values) in enumerate(zip(axes[0], log_alphas)):
            ax.hist(values.flatten().numpy(), bins=60, range=(-8, 8), color="#8172b2")
            ax.axvline(threshold, color="#c44e52", linestyle="--", linewidth=1)
            ax.set_yscale("log")
            ax.set_title(f"layer {i}", fontsize=9)
            ax.set_xlabel("log alpha")
        fig.suptitle(f"log alpha per layer (dropped at >= {threshold:g})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / "log_alpha.png", dpi=100)
        plt.close(fig)
        names.append("log_alpha.png")

    if kept_inputs is not None:
        c, h, w = input_shape
        mask = torch.zeros(c * h * w)
        mask[kept_inputs] = 1
        fig, ax = plt.subplots(figsize=(3, 3))
        ax.imshow(mask.reshape(c, h, w)[0].numpy(), cmap="gray")
        ax.set_title(f"kept inputs: {len(kept_inputs)}/{c * h * w}")
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "kept_inputs.png", dpi=100)
        plt.close(fig)
        names.append("kept_inputs.png")
    return names


def save_export_plot(out_dir: Path, rows: list[dict[str, Any]]) -> str:
    """Throughput at batch 256 and bytes on disk of every model, side by side, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    labels = [row["model"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.4), sharey=True)
    panels = (("samples_per_s_b256", f"samples/s, batch 256 ({rows[0]['threads']} threads)", "#55a868"),
              ("bytes", "bytes on disk (all files)", "#4c72b0"))
    for ax, (key, title, color) in zip(axes, panels):
        values = [row[key] for row in rows]
        ax.barh(labels, values, color=color)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 3, max(values) * 8)  # room for the value labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(title)
        for i, value in enumerate(values):
            ax.text(value * 1.1, i, f"{value:,.0f}", va="center", fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Teacher, dense student and exports")
    fig.tight_layout()
    fig.savefig(out_dir / "exports.png", dpi=100)
    plt.close(fig)
    return "exports.png"
