"""Would weight sharing reach the inference issue's 500x footprint? Bytes and parity of codebook-quantized
sparse students, measured on a finished run.

Each layer's nonzero weights become b-bit codes into 2^b - 1 shared values (1-D k-means, Lloyd's algorithm from
an even spread over [min, max]: Deep Compression's weight sharing without its retraining); codes and gaps are
LZMA2-coded like the sparse export's gaps. Printed per bit width: the bytes (safetensors payload + the sparse
export's spec), the footprint below the teacher's weights file, and how many test predictions differ from the
masked student's -- the parity rule every export must pass (argmax identical on the whole test set).
The float32, float16 and quantized rows are the sparse export itself (`export.sparse_values`); the quantized
export chooses its steps on the training images (near ties left out, `export.near_tie_margin`) and the test
images, so a second quantized row chooses them without the odd-numbered test images: the predictions it changes
are all among those 5,000 unseen images.

    python benchmarks/codebook_parity.py --run artifacts
    python benchmarks/codebook_parity.py --run /tmp/full/mnist-mlp --student vs_bsr   # a reproduce.py folder
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from varstudent.artifacts import load_model
from varstudent.config import load_params
from varstudent.data import load_prepared
from varstudent.export.folded import folded_layers
from varstudent.export.quantized import Selection
from varstudent.export.sparse import encode_csr, load_sparse, pack_bytes, write_sparse
from varstudent.nn.variational import variational_layers
from varstudent.train import predict_logits


def codebook(values: np.ndarray, levels: int, max_iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(sorted float32 centroids, index of each value's nearest one): 1-D k-means, linear initialisation."""
    values = values.astype(np.float64)
    distinct = np.unique(values)
    if distinct.size <= levels:
        return distinct.astype(np.float32), np.searchsorted(distinct, values)
    centroids = np.linspace(values.min(), values.max(), levels)
    for _ in range(max_iterations):  # in 1-D a cluster is an interval: bisect the midpoints to assign
        index = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        counts = np.bincount(index, minlength=levels)
        means = np.bincount(index, weights=values, minlength=levels) / np.maximum(counts, 1)
        updated = np.sort(np.where(counts > 0, means, centroids))  # an empty cluster keeps its place
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    centroids = centroids.astype(np.float32)
    return centroids, np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values.astype(np.float32))


def quantized(prune_dir: Path, bits: int) -> tuple[torch.nn.Module, int]:
    """The compact net with shared weights, and the safetensors bytes of its codes, gaps, codebooks, biases."""
    from safetensors.torch import save

    net = load_model(prune_dir, "compact")
    tensors = {}
    for i, (layer, block) in enumerate(zip(folded_layers(net), net.blocks)):
        matrix = layer.weight.reshape(layer.weight.shape[0], -1).numpy()
        nonzero = matrix != 0
        centroids, index = codebook(matrix[nonzero], 2 ** bits - 1)
        codes = np.zeros(matrix.shape, dtype=np.uint8)
        codes[nonzero] = index + 1  # code 0 = a zero weight (and the CSR's filler entries)
        csr = encode_csr(codes, np.dtype(np.uint8))
        tensors.update({f"{i}.row_entries": torch.from_numpy(csr["row_entries"]),
                        f"{i}.gaps": torch.from_numpy(pack_bytes(csr["gaps"])),
                        f"{i}.codes": torch.from_numpy(pack_bytes(csr["values"])),
                        f"{i}.codebook": torch.from_numpy(centroids), f"{i}.bias": layer.bias})
        shared = np.zeros_like(matrix)
        shared[nonzero] = centroids[index]
        assert block.bn is None, "this benchmark takes MLP students (no batch norm)"
        block.op.weight.data = torch.from_numpy(shared).reshape(block.op.weight.shape)
    if net.input_index is not None:
        mask = np.zeros(int(np.prod(net.spec["input_shape"])), dtype=bool)
        mask[net.input_index.numpy()] = True
        tensors["input_mask"] = torch.from_numpy(np.packbits(mask))
    return net, len(save(tensors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("artifacts"), help="a `varstudent run` OUT folder")
    parser.add_argument("--student", default="", help="subfolder of the student's distill/ and prune/ "
                        "(reproduce.py writes one per row)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    committed = load_params(Path(__file__).parents[1] / "params.yaml")
    parser.add_argument("--near-tie-margin", type=float, default=committed.export.near_tie_margin,
                        help="export.near_tie_margin for the quantized rows (default: the committed params.yaml's)")
    args = parser.parse_args()
    root, row = args.run, args.run / args.student
    data = load_prepared(root / "prepare")
    student = load_model(row / "distill", "student")
    compact = load_model(row / "prune", "compact")
    threshold = float(compact.spec.get("threshold", 3.0))
    for layer in variational_layers(student):
        layer.threshold = threshold
    reference = predict_logits(student, data.x_test)
    teacher_bytes = (root / "teacher" / "teacher.safetensors").stat().st_size
    nonzero = sum(int(np.count_nonzero(layer.weight)) for layer in folded_layers(compact))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"student: {nonzero:,} nonzero weights; teacher weights file {teacher_bytes:,} B; "
          f"{reference.shape[0]:,} test samples")
    print(f"{'values':<30}{'bytes':>9}{'x below teacher':>17}{'B / nonzero':>13}{'predictions differ':>20}"
          f"{'max |logit diff|':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for dtype in ("float32", "float16"):
            write_sparse(compact, folder, dtype, repeats=2)
            size = sum(p.stat().st_size for p in folder.glob("sparse.*"))
            spec_bytes = (folder / "sparse.json").stat().st_size
            row_line(f"sparse {dtype}", size, load_sparse(folder), reference, data.x_test, teacher_bytes, nonzero)
        # quantized values (export/quantized.py): steps chosen on the training (near ties aside) and test images,
        # as the prune stage does; then chosen with the odd test images left out, whose changed predictions it counts
        train = Selection(data.x_train, args.near_tie_margin)
        for name, select in (("quantized", [train, Selection(data.x_test)]),
                             ("quantized, odd test held out", [train, Selection(data.x_test[0::2])])):
            write_sparse(compact, folder, "quantized", repeats=2, select=select)
            size = sum(p.stat().st_size for p in folder.glob("sparse.*"))
            row_line(name, size, load_sparse(folder), reference, data.x_test, teacher_bytes, nonzero)
        for bits in args.bits:
            net, payload = quantized(row / "prune", bits)
            row_line(f"codebook {bits}-bit", payload + spec_bytes, net, reference, data.x_test, teacher_bytes, nonzero)


def row_line(name: str, size: int, model: torch.nn.Module, reference: torch.Tensor, x: torch.Tensor,
             teacher_bytes: int, nonzero: int) -> None:
    logits = predict_logits(model, x)
    differ = int((logits.argmax(1) != reference.argmax(1)).sum())
    print(f"{name:<30}{size:>9,}{teacher_bytes / size:>17.0f}{size / nonzero:>13.2f}{differ:>20}"
          f"{(logits - reference).abs().max().item():>18.3g}")


if __name__ == "__main__":
    main()
