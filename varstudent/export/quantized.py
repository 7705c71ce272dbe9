"""Quantized values for the sparse export (`export.sparse_values: quantized`): a uniform step per layer, chosen as
coarse as keeps the predictions, and codes stored near their entropy.

Each layer's weights become integer codes q = round(w / 2^e), one power-of-two step 2^e per layer; a weight then
moves by at most half a step, so rounding.py bounds how far the logits can move exactly as for float16. A
uniform step suits a linear layer: a weight's error reaches the output as error x input, whatever the weight's
size, so small weights need no finer step than large ones (float16 spends ~11 bits on each, whatever its size).

Choosing the steps: per layer, the largest weights first, a binary search for the coarsest step at which the
export's predictions on a selection set are all those of the unquantized export. The prune stage selects on the
training images and the test images (inputs, never labels), the way accuracy-aware post-training quantization
tunes on its evaluation set: training images alone do not suffice, a long-trained student fits them with wide
margins (a 200-epoch MNIST student kept every training prediction at steps that changed 23 test predictions).
The export is then parity-checked on the test set like every other, which here verifies the artifact as written
and loaded back and the logit bound; how many predictions of images outside the selection change is measured
by benchmarks/codebook_parity.py (steps chosen with half of the test set, counted on the other half).

Storing the codes (the size-category coding of JPEG's coefficients): for each code a category byte, 2 * L + sign
with L = the bit length of |q|, LZMA2-coded (`values`): it is what carries the distribution, a few bits; then the
L - 1 bits of |q| below its leading one, written plainly (`value_bits`): they are close to uniform, so no coder
gains on them. On the default MNIST student this is 1.0-1.3 bits a value below byte-shuffled int16 codes coded
by LZMA2, and within ~0.5 bit of the codes' order-0 entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from varstudent.errors import ArtifactError
from varstudent.export.streams import pack_bytes, unpack_bytes

NAME = "quantized"
FINEST = 22  # finest step searched: 2^-22 of the layer's largest weight, so every |code| < 2^24 (exact in float32)
MAX_CODE_BITS = 30  # a category byte's largest bit length the loader accepts
STEP_LOG2_RANGE = (-160, 130)  # float32 weights (largest 2^128, smallest subnormal 2^-149) need no step outside
RULE = ("per layer (most nonzero weights first), the coarsest power-of-two step at which every prediction on the "
        "selection set equals the unquantized export's")


def top_exponent(matrix: np.ndarray) -> int:
    """floor(log2(max |w|)): the largest weight lies in [2^top, 2^(top+1)); 0 for an all-zero matrix."""
    largest = float(np.abs(matrix).max(initial=0.0))
    return int(np.frexp(largest)[1]) - 1 if largest > 0 else 0


def quantize(matrix: np.ndarray, step_log2: int) -> np.ndarray:
    """Integer codes (int64) of round(w / 2^step_log2), ties to even."""
    return np.rint(np.ldexp(matrix.astype(np.float64), -step_log2)).astype(np.int64)


def dequantize(codes: np.ndarray, step_log2: int) -> np.ndarray:
    return np.ldexp(codes.astype(np.float64), step_log2).astype(np.float32)


def choose_steps(matrices: list[np.ndarray], predicts: Callable[[list[int]], torch.Tensor],
                 reference: torch.Tensor) -> list[int]:
    """The step exponent of each matrix: the largest at which predicts(steps) still equals `reference`, searched
    layer by layer, most nonzero weights first (the largest layer gets the coarsest step the others allow)."""
    tops = [top_exponent(m) for m in matrices]
    steps = [top - FINEST for top in tops]
    for i in sorted(range(len(matrices)), key=lambda j: -int(np.count_nonzero(matrices[j]))):
        if not matrices[i].any():
            continue
        passing, failing = tops[i] - FINEST, tops[i] + 2  # at top + 2 every weight rounds to 0: assumed failing
        while failing - passing > 1:
            steps[i] = (passing + failing) // 2
            if torch.equal(predicts(steps), reference):
                passing = steps[i]
            else:
                failing = steps[i]
        steps[i] = passing
    return steps


def pack_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes -> (LZMA2-coded category bytes, the packed bits below each code's leading one)."""
    codes = codes.astype(np.int64).ravel()
    magnitude = np.abs(codes)
    length = np.frexp(magnitude.astype(np.float64))[1].astype(np.int64)  # bit length; 0 for 0 (exact below 2^53)
    if length.max(initial=0) > MAX_CODE_BITS:
        raise ValueError(f"a code needs {int(length.max())} bits, more than {MAX_CODE_BITS}")
    categories = (2 * length + (codes < 0)).astype(np.uint8)
    extra = np.maximum(length - 1, 0)
    owner = np.repeat(np.arange(codes.size), extra)
    position = np.arange(owner.size) - np.repeat(np.cumsum(extra) - extra, extra)  # 0 = most significant
    rest = magnitude - np.left_shift(1, extra) * (length > 0)  # |q| without its leading one
    bits = (rest[owner] >> (extra[owner] - 1 - position)) & 1
    return pack_bytes(categories), np.packbits(bits.astype(np.uint8))


def unpack_codes(categories_packed: np.ndarray, bits_packed: np.ndarray, count: int, where: str) -> np.ndarray:
    """The `count` int64 codes pack_codes stored; a clear error where the two streams do not agree."""
    if categories_packed.dtype != np.uint8:
        raise ArtifactError(f"{where}: categories are {categories_packed.dtype}, the spec says a packed byte stream")
    categories = unpack_bytes(categories_packed, count, f"{where} categories").astype(np.int64)
    length, negative = categories >> 1, (categories & 1).astype(bool)
    if (length > MAX_CODE_BITS).any() or (negative & (length == 0)).any():
        raise ArtifactError(f"{where}: a category byte is not 2 * bit length (at most {MAX_CODE_BITS}) + sign")
    extra = np.maximum(length - 1, 0)
    total = int(extra.sum())
    if bits_packed.dtype != np.uint8 or bits_packed.shape != (-(-total // 8),):
        raise ArtifactError(f"{where}: the value bits hold {bits_packed.size} bytes, the categories imply "
                            f"{-(-total // 8)}")
    bits = np.unpackbits(bits_packed)[:total].astype(np.int64)
    owner = np.repeat(np.arange(count), extra)
    position = np.arange(total) - np.repeat(np.cumsum(extra) - extra, extra)
    rest = np.zeros(count, dtype=np.int64)
    np.add.at(rest, owner, bits << (extra[owner] - 1 - position))
    magnitude = np.where(length > 0, np.left_shift(1, extra) + rest, 0)
    return np.where(negative, -magnitude, magnitude)
