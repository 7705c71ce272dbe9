"""Measurements and the human-readable report: throughput, the summary table, report.md and plots."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def throughput(model: nn.Module, sample: torch.Tensor, batch_size: int, repeats: int, warmup: int,
               threads: int = 0) -> dict[str, float]:
    """Samples/s and median / p95 latency (ms) of one forward pass at `batch_size`, on the CPU."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = model.to("cpu").eval()
        reps = -(-batch_size // sample.shape[0])
        x = sample.to("cpu").repeat(reps, *([1] * (sample.dim() - 1)))[:batch_size]
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        times.sort()
        median = statistics.median(times)
        p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
        return {"samples_per_s": batch_size / median, "latency_ms_median": 1e3 * median,
                "latency_ms_p95": 1e3 * p95, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(previous)


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


def render_report(metrics: dict[str, Any], layers: list[dict[str, Any]], speed: list[dict[str, Any]],
                  plots: list[str]) -> str:
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
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def save_plots(out_dir: Path, layers: list[dict[str, Any]], history: list[dict[str, float]],
               kept_inputs: torch.Tensor | None, input_shape: list[int]) -> list[str]:
    """Per-layer sparsity bars, the training curves and, for MLPs, the kept-input mask as an image."""
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
