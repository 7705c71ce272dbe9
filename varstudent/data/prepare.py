"""`prepare`'s data path: decode -> validate (the gate) -> low-data subset -> uint8 -> write; and `data check`.

Nothing is written unless the validation suite passes, so a failed run leaves the previous prepared data
exactly as it was; its HTML report goes to `validation-failed.html` beside it for a look.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from varstudent.config import DataConfig, ValidateConfig
from varstudent.data.prepared import MANIFEST_FILE, read_prepared_arrays, write_prepared
from varstudent.data.sources import Layout, expected_layout, load_dataset, load_idx_dir
from varstudent.errors import ConfigError, DataError


def subset_train(x: np.ndarray, y: np.ndarray, seed: int, train_size: int, fraction: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded subset of the training split (source order kept); all of it when not asked."""
    n = len(y)
    keep = train_size if train_size else (round(fraction * n) if fraction < 1.0 else n)
    if train_size > n:
        raise DataError(f"data.train_size {train_size:,} is more than the {n:,} training samples")
    if keep >= n:
        return x, y
    n_classes = len(np.unique(y))
    if keep < n_classes:
        raise DataError(f"a stratified subset of {keep} training samples cannot hold all {n_classes} classes; "
                        "raise data.train_size / data.fraction")
    from sklearn.model_selection import train_test_split

    try:
        index, _ = train_test_split(np.arange(n), train_size=keep, random_state=seed, stratify=y)
    except ValueError as e:  # e.g. a class with a single sample cannot be stratified
        raise DataError(f"cannot draw a stratified subset of {keep} training samples: {e}") from None
    index.sort()
    return x[index], y[index]


# datasets whose test split prepare draws itself (test_fraction, seeded); the others ship their own
_SPLIT_HERE = ("mnist5k", "digits")


def shaping_settings(data: DataConfig, seed: int) -> dict[str, Any]:
    """The settings that decide what `prepare` writes, as recorded in the manifest's `settings`: the seed and
    the test fraction only where they shape the data (a split drawn here, a subset), so that changing the seed
    of a full-MNIST run does not call its prepared data stale."""
    shaping: dict[str, Any] = {"dataset": data.dataset, "train_size": data.train_size, "fraction": data.fraction}
    if data.dataset in _SPLIT_HERE:
        shaping["test_fraction"] = data.test_fraction
    if data.dataset in _SPLIT_HERE or data.train_size or data.fraction < 1.0:
        shaping["seed"] = seed
    return shaping


def check_shaping_settings(manifest: dict[str, Any], data: DataConfig, seed: int, data_dir: Path) -> None:
    """ConfigError unless the prepared data in `data_dir` was made with these settings (data written without a
    record of them, e.g. by `write_prepared` directly, is taken as it is)."""
    recorded = manifest.get("settings")
    if not isinstance(recorded, dict):
        return
    wanted = shaping_settings(data, seed)
    differ = [k for k in sorted(set(recorded) | set(wanted)) if recorded.get(k) != wanted.get(k)]
    if differ:
        def keys(values: dict[str, Any]) -> str:
            return ", ".join(f"{'seed' if k == 'seed' else 'data.' + k}={values.get(k, '(not used)')}"
                             for k in differ)
        raise ConfigError(f"the prepared data in {data_dir} was made with {keys(recorded)}; the settings say "
                          f"{keys(wanted)}: run `varstudent prepare` with them first (or fix the settings)")


def as_uint8(x: np.ndarray) -> np.ndarray:
    """Validated 0..255 pixels as uint8 (float sources are rounded)."""
    return x if x.dtype == np.uint8 else np.rint(x).astype(np.uint8)


def _suite(dataset: str, splits: dict, classes: list[int], layout: Layout, cfg: ValidateConfig):
    from varstudent.data.validate import run_suite  # Great Expectations loads here, and only here

    return run_suite(dataset, splits, classes, layout, cfg.max_class_ratio)


def prepare_dataset(data: DataConfig, validate: ValidateConfig, seed: int, out_dir: Path,
                    report_dir: Path | None = None) -> dict[str, Any]:
    """Decode `data.dataset`, gate it with the validation suite, subset and write; return the manifest
    (which records the subset and the validation summary) plus `validation_seconds`."""
    from varstudent.data.validate import FAILED_REPORT_FILE

    x_train, y_train, x_test, y_test, classes = load_dataset(data.dataset, Path(data.raw_dir), seed,
                                                             data.test_fraction)
    splits = {"train": (x_train, y_train), "test": (x_test, y_test)}
    result = _suite(data.dataset, splits, classes, expected_layout(data.dataset, data.test_fraction), validate)
    out_dir = Path(out_dir)
    if not result.success:
        report = result.write(Path(report_dir or out_dir), FAILED_REPORT_FILE)
        raise DataError(f"{result.message()}\nnothing was written to {out_dir} except the report {report}")
    n_source = len(y_train)
    x_train, y_train = subset_train(x_train, y_train, seed, data.train_size, data.fraction)
    # no timings in the manifest: identical data must give an identical manifest, or DVC reruns every stage
    extra = {"source_n_train": n_source, "validation": {"expectations": len(result.checks), "passed": True},
             "settings": shaping_settings(data, seed)}
    result.write(out_dir)  # before the data: the manifest, written last, marks the whole set complete
    manifest = write_prepared(out_dir, data.dataset, as_uint8(x_train), y_train, as_uint8(x_test), y_test,
                              classes, extra=extra)
    (out_dir / FAILED_REPORT_FILE).unlink(missing_ok=True)  # a stale failure report would mislead
    return {**manifest, "validation_seconds": result.seconds}


def check_path(path: Path, validate: ValidateConfig, report: Path | None = None):
    """Run the suite on a prepared folder (has manifest.json) or a folder of IDX files; return the result."""
    path = Path(path)
    if (path / MANIFEST_FILE).is_file():
        arrays, manifest = read_prepared_arrays(path)
        splits = {"train": (arrays["x_train"], arrays["y_train"]), "test": (arrays["x_test"], arrays["y_test"])}
        classes = list(range(int(manifest["num_classes"])))
        layout = Layout(tuple(classes), tuple(manifest["input_shape"]), int(manifest["n_train"]),
                        int(manifest["n_test"]), "uint8")
        name = f"{manifest.get('dataset', '?')} (prepared, {path})"
    elif path.is_dir():
        x_train, y_train, x_test, y_test, classes = load_idx_dir(path)
        splits = {"train": (x_train, y_train), "test": (x_test, y_test)}
        layout, name = expected_layout(f"dir:{path}", 0.2), f"IDX folder {path}"
    else:
        raise DataError(f"{path}: not a folder; give a prepared folder (with {MANIFEST_FILE}) or a folder of "
                        "IDX files")
    result = _suite(name, splits, classes, layout, validate)
    if report is not None:
        report = Path(report)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(result.html(), encoding="utf-8")
    return result
