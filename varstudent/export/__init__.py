"""Exports of the compact student, each a self-describing artifact (weights + spec, no pickle), parity-checked.

| format        | files (in the prune folder)          | what                                                  |
|---------------|--------------------------------------|-------------------------------------------------------|
| compact       | compact.safetensors + compact.json   | the dense compact net, float32 (always written)      |
| compact_fp16  | compact_fp16.{safetensors,json}      | the same, stored as float16, computed in float32      |
| compact_bf16  | compact_bf16.{safetensors,json}      | the same, stored as bfloat16, computed in float32     |
| sparse        | sparse.safetensors + sparse.json     | CSR storage, per-layer CSR or dense kernels (sparse.py) |
| onnx          | model.onnx + onnx.json               | ONNX graph run with onnxruntime (onnx_graph.py)       |

`write_exports` writes the requested formats, loads each back from disk and checks its test predictions
against the masked student's: argmax identical, and logits within FLOAT32_TOLERANCE for float32 formats, or
within what rounding the parameters to float16 / bfloat16 can move each one (rounding.py) plus that slack for
reduced-precision formats (for quantized sparse values, half a step per weight: quantized.py); a mismatch is a
ParityError naming the format and the number of differing predictions. `exports.json` (written last)
lists what passed, in the order of `export.formats`: the first is what `load_export(folder)` opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from varstudent.artifacts import load_model, read_json, save_model
from varstudent.config import EXPORT_FORMATS
from varstudent.errors import ArtifactError
from varstudent.export.rounding import ROUNDING, rounding_bound
from varstudent.fileio import write_json
from varstudent.nn.architectures import Net

if TYPE_CHECKING:
    from varstudent.export.quantized import Selection

MANIFEST = "exports.json"
FILES = {"compact": ("compact.json", "compact.safetensors"),
         "compact_fp16": ("compact_fp16.json", "compact_fp16.safetensors"),
         "compact_bf16": ("compact_bf16.json", "compact_bf16.safetensors"),
         "sparse": ("sparse.json", "sparse.safetensors"),
         "onnx": ("onnx.json", "model.onnx")}
REDUCED = {"compact_fp16": torch.float16, "compact_bf16": torch.bfloat16}
# max |logit difference| to the masked student of a float32 format: they differ by rounding order only (folded
# batch norm, other kernels). A float16 / bfloat16 format may differ by its rounding bound on top (rounding.py).
# Argmax must be identical in every case: on the MNIST MLP pair (20 epochs) float16 kept all 10,000 test
# predictions (max logit difference 0.008), bfloat16 changed one (0.078), so compact_bf16 fails there.
FLOAT32_TOLERANCE = 1e-4


class ParityError(ArtifactError):
    """An export does not reproduce the masked student's predictions."""


def precision(fmt: str, sparse_values: str = "float32") -> str:
    if fmt in REDUCED:
        return str(REDUCED[fmt]).removeprefix("torch.")
    return sparse_values if fmt == "sparse" else "float32"


def check_parity(fmt: str, reference: torch.Tensor, logits: torch.Tensor,
                 atol: float | torch.Tensor) -> dict[str, Any]:
    """Argmax identical and every |logit difference| <= atol (a number, or one bound per sample and logit),
    or a ParityError that says by how much."""
    differ = int((reference.argmax(1) != logits.argmax(1)).sum())
    gap = (reference - logits).abs()
    max_diff, excess = gap.max().item(), (gap - atol).max().item()
    largest = float(atol) if isinstance(atol, float) else atol.max().item()
    if differ or not excess <= 0:
        if isinstance(atol, float):
            allowed = f"tolerance {atol:g}"
        elif excess > 0:
            allowed = f"over its rounding bound by up to {excess:.3g}"
        else:
            allowed = f"within its rounding bound, which reaches {largest:.3g}"
        raise ParityError(f"export '{fmt}' fails the parity check: {differ} of {reference.shape[0]} test "
                          f"predictions differ from the masked student's, max logit difference {max_diff:.3g} "
                          f"({allowed})")
    return {"max_logit_difference": max_diff, "tolerance": largest, "differing_predictions": differ}


def write_export(fmt: str, net: Net, directory: Path, sparse_values: str = "float32",
                 choose_repeats: int = 20, select: list[Selection] | None = None) -> None:
    """Write one export of the compact `net` (compact itself is the prune stage's own output)."""
    if fmt in REDUCED:
        save_model(net, directory, fmt, meta={"export_format": fmt}, storage_dtype=REDUCED[fmt])
    elif fmt == "sparse":
        from varstudent.export.sparse import write_sparse

        write_sparse(net, directory, sparse_values, choose_repeats, select)
    elif fmt == "onnx":
        from varstudent.export.onnx_graph import write_onnx

        write_onnx(net, directory)
    elif fmt != "compact":
        raise ArtifactError(f"unknown export format '{fmt}' (known: {', '.join(EXPORT_FORMATS)})")


def write_exports(net: Net, formats: tuple[str, ...] | list[str], directory: Path, x: torch.Tensor,
                  reference: torch.Tensor, sparse_values: str = "float32", choose_repeats: int = 20,
                  select: list[Selection] | None = None) -> dict[str, Any]:
    """Write, reload and parity-check each format against `reference` (the masked student's logits on x).
    `select`: the input batches whose predictions choose the steps of quantized sparse values (quantized.py)."""
    (directory / MANIFEST).unlink(missing_ok=True)  # a failed run must not leave the last run's list behind
    checked: dict[str, Any] = {}
    for fmt in formats:
        stored = precision(fmt, sparse_values)
        try:
            write_export(fmt, net, directory, sparse_values, choose_repeats, select)
            checked[fmt] = _check_export(fmt, stored, net, directory, x, reference)
        except ArtifactError:
            if fmt != "compact":  # an export that fails its check is not left where it could be used
                for path in export_files(directory, fmt):
                    path.unlink(missing_ok=True)
            raise
        checked[fmt].update(precision=stored, files=list(FILES[fmt]),
                            tolerance_rule="fixed" if stored == "float32" else "rounding bound + float32 slack",
                            bytes=sum(p.stat().st_size for p in export_files(directory, fmt)))
    manifest = {"formats": list(formats), "exports": checked, "checked_on": f"{x.shape[0]} test samples"}
    write_json(directory / MANIFEST, manifest)
    return manifest


def _check_export(fmt: str, stored: str, net: Net, directory: Path, x: torch.Tensor,
                  reference: torch.Tensor) -> dict[str, Any]:
    """check_parity of the export on disk, with the tolerance its precision allows."""
    from varstudent.train import predict_logits

    atol: float | torch.Tensor = FLOAT32_TOLERANCE
    if stored in ROUNDING:  # the sparse export folds batch norm and keeps float32 biases
        atol = rounding_bound(net, x, stored, folded=fmt == "sparse") + FLOAT32_TOLERANCE
    elif stored == "quantized":
        steps = [2.0 ** c["step_log2"] for c in read_json(directory / FILES[fmt][0], "sparse export")["choices"]]
        atol = rounding_bound(net, x, stored, folded=True, steps=steps) + FLOAT32_TOLERANCE
    return check_parity(fmt, reference, predict_logits(load_export(directory, fmt), x), atol)


def export_files(directory: Path, fmt: str) -> list[Path]:
    return [directory / name for name in FILES[fmt] if (directory / name).is_file()]


def listed_exports(directory: Path) -> list[str]:
    """The formats the last prune wrote and checked (compact alone for a folder without exports.json)."""
    if (directory / MANIFEST).is_file():
        formats = read_json(directory / MANIFEST, "export list").get("formats", [])
        return [f for f in formats if f in FILES]
    return ["compact"] if (directory / "compact.json").is_file() else []


def _format_of_file(path: Path) -> str:
    for fmt, names in FILES.items():
        if path.name in names:
            return fmt
    known = ", ".join(name for names in FILES.values() for name in names)
    raise ArtifactError(f"{path}: not an export file name this version knows ({known}); pass the folder")


def load_export(path: str | Path, format: str | None = None, threads: int = 0) -> nn.Module:
    """One call for every format: an export folder (its first listed format, or `format`) or one of its files.

    Returns a module mapping a float tensor (B, C, H, W) in [0, 1] to logits (B, classes), on the CPU, with
    `.spec` (input_shape, num_classes) and `.export_format`. `threads` sets onnxruntime's intra-op threads.
    """
    path = Path(path)
    if path.is_dir():
        directory = path
        listed = listed_exports(directory)
        if format is None and not listed:
            raise ArtifactError(f"no export found in {directory}: run `varstudent prune` first")
        fmt = format or listed[0]
        if fmt in FILES and fmt not in listed and not (directory / FILES[fmt][0]).is_file():
            raise ArtifactError(f"no '{fmt}' export in {directory} (it has: {', '.join(listed) or 'none'}); "
                                f"add it to export.formats and run `varstudent prune`")
    elif path.is_file():
        directory, fmt = path.parent, _format_of_file(path)
        if format is not None and format != fmt:
            raise ArtifactError(f"{path} is a '{fmt}' export file, not '{format}'")
    else:
        raise ArtifactError(f"no model at {path}: pass an export folder (e.g. artifacts/prune) or file")
    if fmt not in FILES:
        raise ArtifactError(f"unknown export format '{fmt}' (known: {', '.join(FILES)})")
    if fmt == "sparse":
        from varstudent.export.sparse import load_sparse

        model: nn.Module = load_sparse(directory)
    elif fmt == "onnx":
        from varstudent.export.onnx_graph import load_onnx

        model = load_onnx(directory, threads)
    else:
        model = load_model(directory, fmt)
    _dry_run(model, directory / FILES[fmt][0])
    model.export_format = fmt
    return model


@torch.no_grad()
def _dry_run(model: nn.Module, where: Path) -> None:
    """One zero image through the model: layers whose shapes do not chain are an error now, not at use."""
    from varstudent.nn.architectures import spec_io_problem

    spec = model.spec
    problem = spec_io_problem(spec)
    if problem:
        raise ArtifactError(f"{where}: malformed spec ({problem})")
    try:
        out = model(torch.zeros(1, *spec["input_shape"]))
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ArtifactError(f"{where}: the layers do not fit together ({str(exc).splitlines()[0][:200]})") from None
    if tuple(out.shape) != (1, spec["num_classes"]):
        raise ArtifactError(f"{where}: the model outputs shape {tuple(out.shape)[1:]}, the spec says "
                            f"({spec['num_classes']},)")


def weight_stats(model: nn.Module) -> tuple[int, int]:
    """(weight entries of the layer matrices, nonzero ones) of any model this package makes or loads."""
    if hasattr(model, "weight_stats"):
        return model.weight_stats()
    from varstudent.prune import layer_table

    rows = layer_table(model)  # masked for a variational student
    return sum(r["weights"] for r in rows), sum(r["nonzero"] for r in rows)
