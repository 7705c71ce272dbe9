"""The sparse export: every weight matrix stored compressed, each linear layer run by the faster kernel.

Storage (sparse.safetensors), per layer i, whichever of the two is smaller:
- CSR with relative column indices: `layers.i.row_entries` (entries per row), `layers.i.gaps` (one byte per
  entry: the column advance minus 1, entropy-coded, see below) and `layers.i.values`. A gap over 256 columns
  takes filler entries (advance 256, value 0), the relative indexing of Han, Mao, Dally (Deep Compression,
  ICLR 2016), so an index costs one byte whatever the width. A conv weight (out, in, k, k) is stored as the
  (out, in*k*k) matrix.
- dense: `layers.i.weight`, all out*in*k*k values (coded as below), when the matrix has so few zeros that CSR
  would be larger.
Values are float32, or float16 on request; biases are float32. Or, `quantized`, integer codes on one
power-of-two step per layer, biases included, in a size-category stream `values` (`weight` for a dense-stored
layer) and its plain bits `value_bits` (`weight_bits`), the biases' codes after the weights' (quantized.py).
Batch norm is folded into the weights (folded.py). An MLP's kept inputs are `input_mask`, one bit per input
pixel.

The gap stream is stored LZMA2-compressed (raw, the standard library's `lzma`): a one-byte gap carries ~3.3
bits of information on the MNIST student, and the coder gets within 5 % of that order-0 entropy (what Deep
Compression's Huffman stage does, done by a stock coder): 10,819 gap bytes of the 40-epoch student's first
layer are stored in 4,625. The values are stored losslessly coded the same way after a byte shuffle (byte 0 of
every value, then byte 1, ..., the HDF5 / Blosc shuffle filter): the sign-and-exponent bytes of trained weights
span a few magnitudes and code to under half a byte, the mantissa bytes stay ~8 bits (a 40-epoch default student's
35,260 value bytes -> 30,391 as float32, 17,630 -> 15,478 as float16).

Execution: a linear layer runs as CSR (torch.addmm with a sparse CSR matrix) or dense (torch.addmm), both on
the transposed activations W @ H (run_chain), whichever was faster at batch 256 when the export was written
(both timed at batch 1 and 256 with warm-up and repeats; the times and the choice are recorded in sparse.json).
Convolutions are decompressed to dense at load and run with
F.conv2d: torch has no sparse convolution kernel on the CPU, so for them CSR is a storage format only.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from varstudent.artifacts import read_tensors, write_tensors
from varstudent.errors import ArtifactError
from varstudent.export import quantized
from varstudent.export.folded import export_spec, folded_layers
from varstudent.export.streams import pack_bytes, unpack_bytes
from varstudent.nn.architectures import ColumnPlan, Net, affine_columns, relu_pool, run_chain

NAME = "sparse"
FILLER_STRIDE = 256  # the largest column advance one uint8 gap encodes
CHOICE_RULE = "csr when its median time at batch 256 is below dense's, else dense; convolutions always dense"
# how gaps and values are stored (sparse.json's `streams`): exports before this version say "lzma2-raw" (gaps
# coded, values plain) or nothing (both plain); they still load
STREAMS = "lzma2-raw gaps, lzma2-raw shuffled values"
QUANTIZED_STREAMS = "lzma2-raw gaps, lzma2-raw value categories + plain value bits"  # quantized.py
OLDER_STREAMS = ("raw", "lzma2-raw")
_NUMPY_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32)
# a layer is decoded to a dense float32 matrix: the spec may not ask for more than 1 GiB of it (a crafted spec
# could otherwise ask for any size); the largest layer any architecture here has is VGG-like's 2.4M weights
MAX_LAYER_WEIGHTS = 2**28


def pack_values(values: np.ndarray) -> np.ndarray:
    """Little-endian float values -> their bytes shuffled into planes (all first bytes, then all second ...),
    LZMA2-packed: the planes of sign and exponent bits are what compresses."""
    little = values.astype(values.dtype.newbyteorder("<"))
    planes = little.view(np.uint8).reshape(-1, values.dtype.itemsize).T
    return pack_bytes(np.ascontiguousarray(planes).ravel())


def unpack_values(packed: np.ndarray, count: int, dtype: np.dtype, where: str) -> np.ndarray:
    """The `count` values of `dtype` packed by pack_values."""
    planes = unpack_bytes(packed, count * dtype.itemsize, where).reshape(dtype.itemsize, count)
    return np.ascontiguousarray(planes.T).view(dtype.newbyteorder("<")).ravel().astype(dtype)


def _smallest_uint(max_value: int) -> np.dtype:
    """uint8 / int16 / int32: the smallest safetensors-friendly integer dtype that holds max_value."""
    for dtype in (np.uint8, np.int16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def encode_csr(matrix: np.ndarray, values_dtype: np.dtype) -> dict[str, np.ndarray]:
    """(out, n) matrix -> row_entries (out,), gaps (E,) uint8, values (E,): CSR with one-byte relative indices."""
    rows, cols = np.nonzero(matrix)  # row-major order: columns ascend within each row
    values = matrix[rows, cols]
    row_start = np.r_[True, rows[1:] != rows[:-1]] if rows.size else np.zeros(0, bool)
    previous = np.where(row_start, -1, np.r_[-1, cols[:-1]])
    gap = cols - previous  # >= 1: columns from the previous nonzero of the row (or from column -1)
    fillers = (gap - 1) // FILLER_STRIDE
    entries = fillers + 1  # each nonzero is preceded by its fillers
    advance = np.full(int(entries.sum()), FILLER_STRIDE, dtype=np.int64)
    stored = np.zeros(advance.size, dtype=values_dtype)
    last = np.cumsum(entries) - 1
    advance[last] = gap - FILLER_STRIDE * fillers  # in 1..256
    stored[last] = values
    row_entries = np.bincount(np.repeat(rows, entries), minlength=matrix.shape[0])
    return {"row_entries": row_entries.astype(_smallest_uint(int(row_entries.max(initial=0)))),
            "gaps": (advance - 1).astype(np.uint8), "values": stored}


def decode_csr(row_entries: np.ndarray, gaps: np.ndarray, values: np.ndarray, shape: tuple[int, int],
               where: str) -> np.ndarray:
    """The dense float32 (out, n) matrix; a clear error when the arrays do not fit `shape`."""
    out, n = shape
    entries = row_entries.astype(np.int64)
    if row_entries.shape != (out,) or (entries < 0).any():
        raise ArtifactError(f"{where}: row_entries has shape {row_entries.shape}, the spec says ({out},)")
    total = int(entries.sum())
    if gaps.shape != (total,) or values.shape != (total,):
        raise ArtifactError(f"{where}: gaps {gaps.shape} and values {values.shape} should both hold the "
                            f"{total} entries that row_entries counts")
    advance = np.cumsum(gaps.astype(np.int64) + 1)  # running column + 1, across rows
    before_row = np.r_[0, advance][np.cumsum(entries) - entries]  # the running sum where each row starts
    cols = advance - np.repeat(before_row, entries) - 1
    if total and cols.max() >= n:
        raise ArtifactError(f"{where}: a column index reaches {int(cols.max())}, the layer has {n} inputs")
    dense = np.zeros((out, n), dtype=np.float32)
    dense[np.repeat(np.arange(out), entries), cols] = values.astype(np.float32)  # fillers write a 0
    return dense


def _median_ms(fn, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    inner = 20 if x.shape[0] == 1 else 1  # a batch-1 call takes microseconds: time 20 at once
    for _ in range(warmup * inner):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn(x)
        times.append((time.perf_counter() - start) / inner)
    return float(f"{1e3 * statistics.median(times):.4g}")  # 4 digits: the spec's bytes count


@torch.no_grad()
def time_linear(weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Median ms of dense and CSR execution at batch 1 and 256, and the faster by CHOICE_RULE."""
    csr = _csr(weight)
    ms: dict[str, dict[str, float]] = {"dense": {}, "csr": {}}
    for batch in (1, 256):
        x = torch.rand(batch, weight.shape[1])  # timed as run_chain runs them: on transposed activations
        ms["dense"][f"b{batch}"] = _median_ms(lambda v: torch.addmm(bias[:, None], weight, v.t()), x, repeats)
        ms["csr"][f"b{batch}"] = _median_ms(lambda v: torch.addmm(bias[:, None], csr, v.t()), x, repeats)
    execution = "csr" if ms["csr"]["b256"] < ms["dense"]["b256"] else "dense"
    return {"execution": execution, "ms": ms}


def _csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
        warnings.simplefilter("ignore", UserWarning)
        return weight.to_sparse_csr()


class SparseLayer(nn.Module):
    """One layer: CSR or dense linear, or dense conv; then ReLU and 2x2 max pool as the spec says."""

    def __init__(self, spec: dict[str, Any], weight: torch.Tensor, bias: torch.Tensor, execution: str) -> None:
        super().__init__()
        self.kind, self.relu, self.pool = spec["kind"], spec["relu"], bool(spec.get("pool"))
        self.padding = int(spec.get("padding", 0))
        self.bias = bias
        self.csr = _csr(weight) if execution == "csr" else None
        self.weight = None if execution == "csr" else weight

    def columns_ready(self) -> bool:
        return self.kind == "linear"

    def forward_columns(self, h: torch.Tensor) -> torch.Tensor:
        """(in, B) -> (out, B): CSR or dense W (out, in) @ h, the form both kernels were timed in."""
        return affine_columns(self.csr if self.csr is not None else self.weight, self.bias, h, self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":  # run_chain calls forward_columns itself; this is for a layer used alone
            return self.forward_columns(x.t()).t()
        return relu_pool(F.conv2d(x, self.weight, self.bias, padding=self.padding), self.relu, self.pool,
                         fast=not torch.is_grad_enabled())

    def weight_stats(self) -> tuple[int, int]:
        weight = self.csr if self.csr is not None else self.weight
        nonzero = int(self.csr.values().ne(0).sum()) if self.csr is not None else int(weight.ne(0).sum())
        return int(np.prod(weight.shape)), nonzero


class SparseNet(nn.Module):
    """The sparse export loaded back: same call as Net, (B, C, H, W) -> logits (B, classes), on the CPU."""

    def __init__(self, spec: dict[str, Any], layers: list[SparseLayer], input_index: torch.Tensor | None) -> None:
        super().__init__()
        self.spec, self.layers, self.input_index = spec, nn.ModuleList(layers), input_index
        self.plan = None  # an MLP runs as a ColumnPlan of its (fixed) layers
        if all(lay.columns_ready() for lay in layers):
            self.plan = ColumnPlan.of([(lay.csr if lay.csr is not None else lay.weight, lay.bias, lay.relu)
                                       for lay in layers], input_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.run(x) if self.plan is not None else run_chain(x, self.layers, self.input_index)

    def weight_stats(self) -> tuple[int, int]:
        stats = [layer.weight_stats() for layer in self.layers]
        return sum(s[0] for s in stats), sum(s[1] for s in stats)


def write_sparse(net: Net, directory: Path, values_dtype: str = "float32", repeats: int = 20,
                 select: list[quantized.Selection] | None = None) -> Path:
    """Write the sparse export of the compact `net`. values_dtype "quantized" needs `select`, the input batches
    whose predictions choose the steps (quantized.py)."""
    layers = folded_layers(net)
    spec = export_spec(net, layers)
    matrices = [layer.weight.reshape(layer.weight.shape[0], -1).numpy() for layer in layers]  # (out, in*k*k)
    steps = None
    if values_dtype == quantized.NAME:
        if not select:
            raise ValueError("quantized values need the selection inputs that choose their steps")
        steps, selected = _quantized_steps(layers, spec, net.input_index, matrices, select)
    tensors: dict[str, torch.Tensor] = {}
    if net.input_index is not None:
        mask = np.zeros(int(np.prod(spec["input_shape"])), dtype=bool)
        mask[net.input_index.numpy()] = True
        tensors["input_mask"] = torch.from_numpy(np.packbits(mask))  # one bit per input pixel
    choices = []
    for i, (layer, matrix) in enumerate(zip(layers, matrices)):
        if steps is None:
            vdtype = np.dtype(values_dtype)
            csr = encode_csr(matrix, vdtype)
            stored = {"row_entries": csr["row_entries"], "gaps": pack_bytes(csr["gaps"]),
                      "values": pack_values(csr["values"])}
            dense = {"weight": pack_values(matrix.astype(vdtype).ravel())}  # zeros included, coded the same way
            rounded = matrix.astype(vdtype).astype(np.float32)
            bias = layer.bias
        else:  # the bias codes follow the weight codes in the same stream, on the same step
            codes, bias_codes = quantized.quantize(matrix, steps[i]), quantized.quantize(layer.bias.numpy(), steps[i])
            csr = encode_csr(codes, np.dtype(np.int64))  # a weight rounded to 0 leaves the CSR
            categories, bits = quantized.pack_codes(np.r_[csr["values"], bias_codes])
            stored = {"row_entries": csr["row_entries"], "gaps": pack_bytes(csr["gaps"]), "values": categories,
                      "value_bits": bits}
            categories, bits = quantized.pack_codes(np.r_[codes.ravel(), bias_codes])
            dense = {"weight": categories, "weight_bits": bits}
            rounded = quantized.dequantize(codes, steps[i])
            bias = torch.from_numpy(quantized.dequantize(bias_codes, steps[i]))
        csr_bytes, dense_bytes = (sum(a.nbytes for a in part.values()) for part in (stored, dense))
        storage = "csr" if csr_bytes < dense_bytes else "dense"
        tensors.update({f"layers.{i}.{k}": torch.from_numpy(v) for k, v in (stored if storage == "csr"
                                                                            else dense).items()})
        if steps is None:
            tensors[f"layers.{i}.bias"] = bias
        choice: dict[str, Any] = {"storage": storage, "csr_bytes": int(csr_bytes), "dense_bytes": int(dense_bytes),
                                  "nonzero": int(np.count_nonzero(rounded)), "weights": int(matrix.size)}
        if steps is not None:
            choice["step_log2"] = steps[i]
        if layer.kind == "linear":
            choice.update(time_linear(torch.from_numpy(rounded), bias, repeats))
        else:
            choice.update(execution="dense", ms=None)
        choices.append(choice)
    doc = {"format": NAME, "spec": spec, "input_mask": "input_mask" in tensors, "values_dtype": values_dtype,
           "streams": STREAMS if steps is None else QUANTIZED_STREAMS, "choices": choices, "rule": CHOICE_RULE,
           "threads": torch.get_num_threads()}
    if steps is not None:
        doc["quantized"] = {"rule": quantized.RULE, **selected}
    return write_tensors(directory, NAME, tensors, doc, one_line=True)  # indentation was ~1 kB of ~15 kB


def _quantized_steps(layers: list, spec: dict[str, Any], input_index: torch.Tensor | None,
                     matrices: list[np.ndarray], select: list[quantized.Selection]) -> tuple[list[int], dict[str, Any]]:
    """quantized.choose_steps with this format's own forward: predictions of the export on `select` with the
    layers' weights quantized, against those of the unquantized export. Also what was selected: the number of
    images, and of near ties left out (each selection's margin applied to the unquantized export's logits)."""
    from varstudent.train import predict_logits

    biases = [lay.bias.numpy() for lay in layers]

    def logits(weights: list[np.ndarray], biases: list[np.ndarray], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        built = [SparseLayer(s, torch.from_numpy(w).reshape(lay.weight.shape), torch.from_numpy(b), "dense")
                 for s, w, b, lay in zip(spec["layers"], weights, biases, layers)]
        net = SparseNet(spec, built, input_index)
        outputs = spec["layers"][-1]["out"]
        with torch.no_grad():  # a selection may be left with no image (all near ties, or none to leave out)
            return [predict_logits(net, x) if x.shape[0] else torch.empty(0, outputs) for x in inputs]

    def rounded(arrays: list[np.ndarray], steps: list[int]) -> list[np.ndarray]:
        return [quantized.dequantize(quantized.quantize(a, e), e) for a, e in zip(arrays, steps)]

    weights = [m.astype(np.float32) for m in matrices]
    unquantized = logits(weights, biases, [part.x for part in select])
    near_ties = [quantized.top_two_margin(z) < part.near_tie_margin for z, part in zip(unquantized, select)]
    inputs = [part.x[~tie] if tie.any() else part.x for part, tie in zip(select, near_ties)]  # no copy if none
    reference = torch.cat([z[~tie].argmax(1) for z, tie in zip(unquantized, near_ties)])
    if not reference.numel():  # every step would pass, rounding nearly every weight to 0
        raise ValueError("the quantized steps' selection is empty: no input, or every one a near tie")

    def predicts(steps: list[int]) -> torch.Tensor:
        return torch.cat([z.argmax(1) for z in logits(rounded(matrices, steps), rounded(biases, steps), inputs)])

    values = [np.r_[m.ravel(), b] for m, b in zip(matrices, biases)]  # a layer's step covers both
    steps = quantized.choose_steps(values, predicts, reference)
    ties = [part.x[tie] for part, tie in zip(select, near_ties)]
    changed = logits(rounded(matrices, steps), rounded(biases, steps), ties)
    # kept lean: the JSON is part of the footprint (~60 B here, on exports of 2-30 kB)
    return steps, {"selection_samples": int(reference.shape[0]),
                   "tie_margins": [part.near_tie_margin for part in select],
                   "ties_left_out": sum(int(tie.sum()) for tie in near_ties),
                   "ties_changed": sum(int((z.argmax(1) != u[tie].argmax(1)).sum())
                                       for tie, z, u in zip(near_ties, changed, unquantized))}


def _tensor(tensors: dict[str, torch.Tensor], key: str, where: str) -> np.ndarray:
    if key not in tensors:
        raise ArtifactError(f"{where}: tensor {key} is missing")
    if tensors[key].dtype not in _NUMPY_DTYPES:  # e.g. bfloat16, which NumPy cannot hold
        raise ArtifactError(f"{where}: tensor {key} is {tensors[key].dtype}, not a dtype this format stores")
    return tensors[key].numpy()


def load_sparse(directory: Path) -> SparseNet:
    doc, tensors = read_tensors(directory, NAME, "sparse export")
    where = str(directory / f"{NAME}.safetensors")
    try:
        spec, choices = doc["spec"], doc["choices"]
        specs = spec["layers"]
        input_shape = [int(d) for d in spec["input_shape"]]
        streams = doc.get("streams", "raw")  # sparse exports written before the gaps were coded still load
        is_quantized = doc["values_dtype"] == quantized.NAME
        values_dtype = None if is_quantized else np.dtype(doc["values_dtype"])
        if doc["format"] != NAME or len(choices) != len(specs) or not specs \
                or (streams != QUANTIZED_STREAMS if is_quantized else
                    streams not in (*OLDER_STREAMS, STREAMS) or values_dtype.kind != "f"):
            raise ValueError("format, streams, values_dtype, or the number of layers and choices differ")
        expected = {"input_mask"} if doc["input_mask"] else set()
        for i, (layer, choice) in enumerate(zip(specs, choices)):
            if choice["storage"] not in ("csr", "dense") or choice["execution"] not in ("csr", "dense") \
                    or layer["kind"] not in ("linear", "conv"):
                raise ValueError(f"layer {i}: unknown kind, storage or execution")
            dims = [layer["out"], layer["in"], layer["kernel"] if layer["kind"] == "conv" else 1]
            if not all(type(d) is int and d > 0 for d in dims) or dims[0] * dims[1] * dims[2] ** 2 > MAX_LAYER_WEIGHTS:
                raise ValueError(f"layer {i}: sizes (out, in, kernel) {dims} are not positive integers of at most "
                                 f"{MAX_LAYER_WEIGHTS:,} weights")
            if is_quantized:
                low, high = quantized.STEP_LOG2_RANGE
                if type(choice.get("step_log2")) is not int or not low <= choice["step_log2"] <= high:
                    raise ValueError(f"layer {i}: step_log2 {choice.get('step_log2')!r} is not an integer in "
                                     f"[{low}, {high}]")
            parts = ("row_entries", "gaps", "values") if choice["storage"] == "csr" else ("weight",)
            if is_quantized:  # the bias codes are in the values' (weight's) stream
                parts += ("value_bits",) if choice["storage"] == "csr" else ("weight_bits",)
            expected |= {f"layers.{i}.{p}" for p in (*parts, *(() if is_quantized else ("bias",)))}
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{directory / (NAME + '.json')}: not a sparse export spec ({exc!r})") from None
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ArtifactError(f"{where}: tensors do not match the spec (missing: {missing[:3]}, "
                            f"unexpected: {extra[:3]})")
    input_index = None
    if doc["input_mask"]:
        n_pixels = int(np.prod(input_shape))
        bits = _tensor(tensors, "input_mask", where)
        if bits.shape != (-(-n_pixels // 8),):
            raise ArtifactError(f"{where}: input_mask has shape {bits.shape}, {n_pixels} input pixels need "
                                f"({-(-n_pixels // 8)},)")
        input_index = torch.from_numpy(np.flatnonzero(np.unpackbits(bits)[:n_pixels]))
    layers = []
    for i, (layer, choice) in enumerate(zip(specs, choices)):
        k = layer["kernel"] if layer["kind"] == "conv" else 1
        shape = (layer["out"], layer["in"], k, k) if layer["kind"] == "conv" else (layer["out"], layer["in"])
        matrix_shape = (layer["out"], layer["in"] * k * k)
        if is_quantized:
            matrix, bias_values = _decode_quantized(tensors, i, choice, matrix_shape, f"{where}: layer {i}")
            weight, bias = torch.from_numpy(matrix).reshape(shape), torch.from_numpy(bias_values)
        else:
            weight, bias = _float_layer(tensors, i, choice, shape, streams, values_dtype, where)
        if tuple(weight.shape) != shape:
            raise ArtifactError(f"{where}: tensor layers.{i}.weight has shape {tuple(weight.shape)}, the spec says "
                                f"{shape}")
        layers.append(SparseLayer(layer, weight, bias, choice["execution"] if layer["kind"] == "linear" else "dense"))
    return SparseNet(spec, layers, input_index).eval()


def _float_layer(tensors: dict[str, torch.Tensor], i: int, choice: dict[str, Any], shape: tuple[int, ...],
                 streams: str, values_dtype: np.dtype, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 / float16 layer's weight (in `shape`, or a clear error) and bias, as `streams` stored them."""
    bias = tensors[f"layers.{i}.bias"].float()
    if tuple(bias.shape) != shape[:1]:  # checked before any stream of the layer is inflated
        raise ArtifactError(f"{where}: tensor layers.{i}.bias has shape {tuple(bias.shape)}, the spec says "
                            f"{shape[:1]}")
    if choice["storage"] == "csr":
        matrix = _decode_layer(tensors, i, (shape[0], int(np.prod(shape[1:]))), streams, values_dtype,
                               f"{where}: layer {i}")
        return torch.from_numpy(matrix).reshape(shape), bias
    if streams == STREAMS:
        packed = _tensor(tensors, f"layers.{i}.weight", where)
        if packed.dtype != np.uint8:
            raise ArtifactError(f"{where}: layers.{i}.weight is {packed.dtype}, the spec says a packed byte stream")
        values = unpack_values(packed, int(np.prod(shape)), values_dtype, f"{where}: layers.{i}.weight")
        return torch.from_numpy(values.astype(np.float32).reshape(shape)), bias
    return tensors[f"layers.{i}.weight"].float(), bias


def _row_entries(tensors: dict[str, torch.Tensor], i: int, shape: tuple[int, int], where: str
                 ) -> tuple[np.ndarray, int]:
    """A CSR layer's entries per row, checked against its shape, and their sum: the length its streams inflate to."""
    row_entries = _tensor(tensors, f"layers.{i}.row_entries", where)
    if row_entries.shape != (shape[0],):
        raise ArtifactError(f"{where}: row_entries has shape {row_entries.shape}, the spec says ({shape[0]},)")
    counts = row_entries.astype(np.int64)
    most = shape[1] + -(-shape[1] // FILLER_STRIDE)  # every column of a row, and the fillers of its gaps
    if row_entries.dtype.kind not in "iu" or (counts < 0).any() or (counts > most).any():
        raise ArtifactError(f"{where}: row_entries must count 0..{most} entries per row of {shape[1]} columns")
    return row_entries, int(counts.sum())


def _decode_layer(tensors: dict[str, torch.Tensor], i: int, shape: tuple[int, int], streams: str,
                  values_dtype: np.dtype, where: str) -> np.ndarray:
    """One CSR-stored layer back to its dense float32 (out, n) matrix, its gaps and values decoded as `streams`
    says they were stored."""
    row_entries, entries = _row_entries(tensors, i, shape, where)
    gaps = _tensor(tensors, f"layers.{i}.gaps", where)
    values = _tensor(tensors, f"layers.{i}.values", where)
    if streams != "raw":
        gaps = unpack_bytes(gaps, entries, f"{where}: gaps")
    if streams == STREAMS:
        if values.dtype != np.uint8:
            raise ArtifactError(f"{where}: values are {values.dtype}, the spec says a packed byte stream")
        values = unpack_values(values, entries, values_dtype, f"{where}: values")
    return decode_csr(row_entries, gaps, values, shape, where)


def _decode_quantized(tensors: dict[str, torch.Tensor], i: int, choice: dict[str, Any], shape: tuple[int, int],
                      where: str) -> tuple[np.ndarray, np.ndarray]:
    """A quantized layer's float32 (out, n) matrix and bias: one code stream holds its weights (the CSR's
    values, or every weight) and then its biases."""
    out, step = shape[0], choice["step_log2"]
    if choice["storage"] == "csr":
        row_entries, entries = _row_entries(tensors, i, shape, where)
        gaps = unpack_bytes(_tensor(tensors, f"layers.{i}.gaps", where), entries, f"{where}: gaps")
        values = quantized.unpack_quantized(_tensor(tensors, f"layers.{i}.values", where),
                                            _tensor(tensors, f"layers.{i}.value_bits", where), entries + out, step,
                                            f"{where}: values")
        matrix = decode_csr(row_entries, gaps, values[:entries], shape, where)
    else:
        values = quantized.unpack_quantized(_tensor(tensors, f"layers.{i}.weight", where),
                                            _tensor(tensors, f"layers.{i}.weight_bits", where),
                                            shape[0] * shape[1] + out, step, f"{where}: weight")
        matrix = values[:-out].reshape(shape)
    return matrix, values[-out:]
