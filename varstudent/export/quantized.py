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
A training image on which the unquantized export's two largest logits are closer than `export.near_tie_margin`
is left out of the selection (test images never are): such a near tie is a coin toss of the student's own
training, and keeping it can cost a layer several bits a weight (a default MNIST run with one training image
at a margin of 1.0e-4 needed a first-layer step of 2^-16 where others need 2^-10 or 2^-11: 402x below the
teacher instead of ~520x). The export changes at most those predictions; how many is recorded in its JSON.
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
from dataclasses import dataclass

import numpy as np
import torch

from varstudent.errors import ArtifactError
from varstudent.export.streams import pack_bytes, unpack_bytes

NAME = "quantized"
FINEST = 22  # finest step searched: 2^-22 of the layer's largest weight or bias: every |code| < 2^24, exact
MAX_CODE_BITS = 30  # a category byte's largest bit length the loader accepts
CHUNK = 1 << 16  # codes decoded at a time: a crafted stream of 2^28 codes needs no more than ~30 MB besides the output
STEP_LOG2_RANGE = (-160, 130)  # float32 weights (largest 2^128, smallest subnormal 2^-149) need no step outside
RULE = ("per layer (most nonzero weights first), the coarsest power-of-two step at which every prediction on the "
        "selection set equals the unquantized export's")


@dataclass(frozen=True, eq=False)  # eq=False: == on tensors is not a bool
class Selection:
    """Input images whose predictions the steps must keep, but for those on which the unquantized export's two
    largest logits differ by less than `near_tie_margin` (0: every image is kept)."""
    x: torch.Tensor
    near_tie_margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.near_tie_margin >= 0:  # NaN too
            raise ValueError(f"near_tie_margin must be >= 0, got {self.near_tie_margin}")


def top_two_margin(logits: torch.Tensor) -> torch.Tensor:
    """Per row, the largest logit minus the second largest (inf for a single output)."""
    if logits.shape[1] < 2:
        return torch.full((logits.shape[0],), float("inf"))
    top = logits.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


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
    """The step exponent of each layer (`matrices`: its weights and biases): the largest at which
    predicts(steps) still equals `reference`, searched layer by layer, most nonzero values first (the largest
    layer gets the coarsest step the others allow). The finest step, 2^-FINEST of a layer's largest value, is
    taken to pass without a check: it moves a value by less than float32 arithmetic does across kernels; the
    export's parity check catches it if not."""
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


def _bit_layout(extra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For codes carrying `extra` plain bits each: the code each bit belongs to, and the bit's shift (the most
    significant bit first)."""
    owner = np.repeat(np.arange(extra.size), extra)
    first_bit = np.cumsum(extra) - extra
    return owner, extra[owner] - 1 - (np.arange(owner.size) - first_bit[owner])


def pack_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes -> (LZMA2-coded category bytes, the packed bits below each code's leading one)."""
    codes = codes.astype(np.int64).ravel()
    magnitude = np.abs(codes)
    length = np.frexp(magnitude.astype(np.float64))[1].astype(np.int64)  # bit length; 0 for 0 (exact below 2^53)
    if length.max(initial=0) > MAX_CODE_BITS:
        raise ValueError(f"a code needs {int(length.max())} bits, more than {MAX_CODE_BITS}")
    categories = (2 * length + (codes < 0)).astype(np.uint8)
    extra = np.maximum(length - 1, 0)
    owner, shift = _bit_layout(extra)
    bits = (magnitude[owner] >> shift) & 1  # the leading one sits at shift `extra`: never among these
    return pack_bytes(categories), np.packbits(bits.astype(np.uint8))


def unpack_quantized(categories_packed: np.ndarray, bits_packed: np.ndarray, count: int, step_log2: int,
                  where: str) -> np.ndarray:
    """The `count` float32 values (codes x 2^step_log2) that pack_codes stored; a clear error where the two
    streams do not agree or a value is not finite. Decoded CHUNK codes at a time."""
    if categories_packed.dtype != np.uint8 or bits_packed.dtype != np.uint8:
        raise ArtifactError(f"{where}: the code streams are {categories_packed.dtype} and {bits_packed.dtype}, "
                            f"the spec says packed byte streams")
    categories = unpack_bytes(categories_packed, count, f"{where} categories")
    length = categories >> 1
    if (length > MAX_CODE_BITS).any() or (categories == 1).any():  # 1 would be "-0"
        raise ArtifactError(f"{where}: a category byte is not 2 * bit length (at most {MAX_CODE_BITS}) + sign")
    extra = np.where(length > 0, length - 1, 0)
    total = int(extra.sum(dtype=np.int64))
    if bits_packed.shape != (-(-total // 8),):
        raise ArtifactError(f"{where}: the value bits hold {bits_packed.size} bytes, the categories imply "
                            f"{-(-total // 8)}")
    values = np.empty(count, dtype=np.float32)
    bit = 0  # where the chunk's plain bits start in the stream
    for start in range(0, count, CHUNK):
        chunk_length = length[start:start + CHUNK].astype(np.int64)
        chunk_extra = extra[start:start + CHUNK].astype(np.int64)
        n_bits = int(chunk_extra.sum())
        first, last = bit // 8, -(-(bit + n_bits) // 8)
        bits = np.unpackbits(bits_packed[first:last])[bit - 8 * first:bit - 8 * first + n_bits].astype(np.int64)
        owner, shift = _bit_layout(chunk_extra)
        rest = np.bincount(owner, weights=bits << shift, minlength=chunk_extra.size)  # exact: < 2^53
        magnitude = np.where(chunk_length > 0, np.left_shift(1, chunk_extra) + rest.astype(np.int64), 0)
        signed = np.where(categories[start:start + CHUNK] & 1, -magnitude, magnitude)
        with np.errstate(over="ignore"):  # an overflow is the clear error below
            values[start:start + CHUNK] = np.ldexp(signed.astype(np.float64), step_log2)
        bit += n_bits
    if not np.isfinite(values).all():
        raise ArtifactError(f"{where}: step 2^{step_log2} makes a value overflow float32")
    return values
