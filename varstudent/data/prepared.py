"""The prepared-data format that every stage after `prepare` reads.

`out_dir/data.safetensors` holds x_train, y_train, x_test, y_test (x uint8 (N, C, H, W), y int64) and
`out_dir/manifest.json` describes them, including the sha256 of the data file, so a later stage can
tell a stale or damaged file from the one `prepare` wrote. The manifest is written last: its presence
means a complete write.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from varstudent.errors import DataError
from varstudent.fileio import atomic_write

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _validate(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
              classes: list[int]) -> None:
    if list(classes) != list(range(len(classes))) or not classes:
        raise DataError(f"classes must be 0..K-1 (labels are used as indices), got {list(classes)[:12]}")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"x_{split} must be a 4-D uint8 array (N, C, H, W), got {x.ndim}-D {x.dtype}")
        if y.dtype != np.int64 or y.ndim != 1:
            raise DataError(f"y_{split} must be a 1-D int64 array, got {y.ndim}-D {y.dtype}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise DataError(f"{split} split has {x.shape[0]} images and {y.shape[0]} labels; need equal and > 0")
        if y.min() < 0 or y.max() >= len(classes):
            raise DataError(f"y_{split} has labels outside the classes 0..{len(classes) - 1}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}")
    missing = sorted(set(classes) - set(np.unique(y_train).tolist()))
    if missing:
        raise DataError(f"classes {missing} have no training examples")


def write_prepared(out_dir: Path, dataset: str, x_train: np.ndarray, y_train: np.ndarray,
                   x_test: np.ndarray, y_test: np.ndarray, classes: list[int],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate and write data.safetensors then manifest.json into `out_dir`; return the manifest
    (`extra` keys, e.g. the validation summary, are recorded in it too)."""
    from safetensors.numpy import save_file

    _validate(x_train, y_train, x_test, y_test, classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in zip(_KEYS, (x_train, y_train, x_test, y_test), strict=True)}
    data_path = out_dir / DATA_FILE
    digest: list[str] = []

    def write_data(tmp: Path) -> None:
        save_file(tensors, tmp)
        digest.append(hashlib.sha256(tmp.read_bytes()).hexdigest())  # hash exactly what was written

    atomic_write(data_path, write_data)
    k = len(classes)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "input_shape": [int(d) for d in x_train.shape[1:]],
        "num_classes": k,
        "n_train": int(x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "class_counts_train": np.bincount(y_train, minlength=k).tolist(),
        "class_counts_test": np.bincount(y_test, minlength=k).tolist(),
        "pixel_mean": float(x_train.mean(dtype=np.float64)),
        "sha256": digest[0],
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(out_dir / MANIFEST_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return manifest


@dataclass(frozen=True)
class PreparedData:
    """Prepared splits as tensors: x float32 in [0, 1] (N, C, H, W), y int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    manifest: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def read_prepared_arrays(data_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The numpy arrays and manifest `write_prepared` wrote, after checking the version and sha256."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data_dir = Path(data_dir)
    manifest_path, data_path = data_dir / MANIFEST_FILE, data_dir / DATA_FILE
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: no prepared data; run `varstudent prepare` first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected_sha = str(manifest["sha256"])
        version = manifest["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{manifest_path}: unreadable manifest ({e!r}); run `varstudent prepare` again") from None
    if version != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: format_version {version}, expected {FORMAT_VERSION}; "
                        "run `varstudent prepare` again")
    if not data_path.is_file():
        raise DataError(f"{data_path}: missing; run `varstudent prepare` first")
    raw = data_path.read_bytes()  # read once: hash and parse the same bytes
    if hashlib.sha256(raw).hexdigest() != expected_sha:
        raise DataError(f"{data_path}: sha256 does not match {MANIFEST_FILE}; it was modified or truncated "
                        "(run `varstudent prepare` again)")
    try:
        arrays = load(raw)
    except SafetensorError as e:
        raise DataError(f"{data_path}: cannot parse ({e})") from None
    missing = [k for k in _KEYS if k not in arrays]
    if missing:
        raise DataError(f"{data_path}: {missing[0]} is missing")
    return arrays, manifest


def load_prepared(data_dir: Path) -> PreparedData:
    """Read what `write_prepared` wrote, checking the sha256 and shapes against the manifest."""
    import torch

    arrays, manifest = read_prepared_arrays(data_dir)
    data_path = Path(data_dir) / DATA_FILE
    try:
        input_shape = [int(d) for d in manifest["input_shape"]]
        n_train, n_test = int(manifest["n_train"]), int(manifest["n_test"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{Path(data_dir) / MANIFEST_FILE}: unreadable manifest ({e!r}); "
                        "run `varstudent prepare` again") from None
    expected = {"x_train": (np.uint8, (n_train, *input_shape)), "y_train": (np.int64, (n_train,)),
                "x_test": (np.uint8, (n_test, *input_shape)), "y_test": (np.int64, (n_test,))}
    for key, (dtype, shape) in expected.items():
        if arrays[key].dtype != dtype or arrays[key].shape != shape:
            got = f"{arrays[key].dtype} {arrays[key].shape}"
            raise DataError(f"{data_path}: {key} should be {np.dtype(dtype)} {shape} per the manifest, got {got}")
    num_classes = int(manifest.get("num_classes", 0))
    for key in ("y_train", "y_test"):  # labels index the logits: one out of range would crash training
        if arrays[key].size and (int(arrays[key].min()) < 0 or int(arrays[key].max()) >= num_classes):
            raise DataError(f"{data_path}: {key} has labels outside the classes 0..{num_classes - 1}")
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return PreparedData(x_train=t["x_train"].to(torch.float32).div_(255.0), y_train=t["y_train"],
                        x_test=t["x_test"].to(torch.float32).div_(255.0), y_test=t["y_test"],
                        manifest=manifest)
