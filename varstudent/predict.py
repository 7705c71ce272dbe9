"""`varstudent predict`: classes and probabilities from an export, for inputs given as .npy batches or images.

Inputs become float (N, C, H, W) in [0, 1], the way `prepare` scales the training data: uint8 (or integer)
pixels 0..255 are divided by 255, float pixels must already lie in 0..1. A .npy batch may be (N, H, W) for
one-channel models, (N, C, H, W) or (N, C*H*W). Images (PNG, JPEG, anything Pillow reads) are converted to
grayscale or RGB by the model's channels and resized to its height and width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from varstudent.errors import DataError


def _scaled(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 / integer 0..255 -> /255; float must be within 0..1; float32 out."""
    if array.dtype.kind in "ui":
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{where}: integer pixels must lie in 0..255, got {array.min()}..{array.max()}")
        return array.astype(np.float32) / 255.0
    if array.dtype.kind == "f":
        if array.size and not np.isfinite(array).all():
            raise DataError(f"{where}: {int((~np.isfinite(array)).sum())} pixels are NaN or infinite")
        if array.size and not (array.min() >= 0 and array.max() <= 1):
            raise DataError(f"{where}: float pixels must lie in 0..1 (uint8 for 0..255), got "
                            f"{array.min():.3g}..{array.max():.3g}")
        return array.astype(np.float32)
    raise DataError(f"{where}: pixels must be uint8 or float, got {array.dtype}")


def read_npy(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """A batch (N, H, W), (N, C, H, W) or (N, C*H*W) -> float32 (N, C, H, W) in [0, 1]."""
    c, h, w = input_shape
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0][:120]})") from None
    shape = array.shape
    if shape[1:] == (c, h, w):
        pass
    elif c == 1 and shape[1:] == (h, w):
        array = array[:, None]
    elif shape[1:] == (c * h * w,):
        array = array.reshape(-1, c, h, w)
    else:
        accepted = ([f"(N, {h}, {w})"] if c == 1 else []) + [f"(N, {c}, {h}, {w})", f"(N, {c * h * w})"]
        raise DataError(f"{path}: input of shape {shape} does not fit the model's input {c}x{h}x{w}; expected "
                        f"{' or '.join(accepted)}")
    return _scaled(array, str(path))


def read_image(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One image file -> float32 (1, C, H, W) in [0, 1], grayscale or RGB and resized as the model needs."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = input_shape
    if c not in (1, 3):
        raise DataError(f"{path}: the model takes {c}-channel inputs; pass them as a .npy batch")
    try:
        with Image.open(path) as image:
            # 16-bit grayscale (PNG, TIFF): convert("L") clips it at 255 (every lit pixel white); take its
            # 0..65535 in floats instead
            sixteen_bit = image.mode.startswith("I") and c == 1
            if sixteen_bit:
                image = (image.convert("I") if image.mode != "I" else image).convert("F")
            else:
                image = image.convert("L" if c == 1 else "RGB")
            if image.size != (w, h):
                image = image.resize((w, h), Image.Resampling.BILINEAR)
            array = (np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0) if sixteen_bit
                     else np.asarray(image, dtype=np.uint8))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not an image this version can read ({str(exc).splitlines()[0][:120]})") from None
    array = array[None, None] if c == 1 else array.transpose(2, 0, 1)[None]  # (1, C, H, W)
    return _scaled(array, str(path))


def read_inputs(paths: list[Path], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """All inputs in order as one float (N, C, H, W) tensor."""
    batches = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"input not found: {path}")
        read = read_npy if path.suffix.lower() == ".npy" else read_image
        batches.append(read(path, input_shape))
    batch = np.concatenate(batches)
    if batch.shape[0] == 0:
        raise DataError("the inputs hold no samples")
    return torch.from_numpy(batch)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> list[dict[str, Any]]:
    """index, class and its softmax probability for every sample."""
    probs = torch.cat([torch.softmax(model(x[i:i + batch_size]), 1) for i in range(0, x.shape[0], batch_size)])
    best, classes = probs.max(1)
    return [{"index": i, "class": int(k), "probability": float(p)}
            for i, (k, p) in enumerate(zip(classes.tolist(), best.tolist()))]


@torch.no_grad()
def class_table(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """A DataFrame, one row per sample: `class`, its `probability`, and every class's `probabilities`.

    What the MLflow pyfunc of a varstudent model answers (also used to infer its signature when logged).
    """
    import pandas as pd

    probs = torch.softmax(model(x), 1).double().numpy()
    return pd.DataFrame({"class": probs.argmax(1).astype(np.int64), "probability": probs.max(1),
                         "probabilities": list(probs)})
