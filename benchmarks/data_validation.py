"""What the data validation suite costs `prepare`: seconds and peak memory, per dataset.

Each dataset runs in a fresh interpreter (so Great Expectations' import is paid as in a real run):
decode, then the suite split into its parts (GX import, building the tables, running the expectations),
then the write; wall and CPU seconds (CPU = about what an uncontended core would take). Then
`varstudent prepare` as a whole, in another fresh process, for its wall time and peak resident memory
(its own getrusage).

    python benchmarks/data_validation.py mnist cifar10 fashion-mnist --raw-dir data/raw
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = r"""
import json, sys, time
from pathlib import Path
t = time.perf_counter()
from varstudent.data.sources import load_dataset, expected_layout
from varstudent.data.prepare import as_uint8
from varstudent.data import profile, write_prepared
name, raw, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
x_tr, y_tr, x_te, y_te, classes = load_dataset(name, raw, 0, 0.2)
splits = {"train": (x_tr, y_tr), "test": (x_te, y_te)}
times = {"decode_s": time.perf_counter() - t}
t, c = time.perf_counter(), time.process_time()
import great_expectations
times["gx_import_s"], times["gx_import_cpu_s"] = time.perf_counter() - t, time.process_time() - c
t = time.perf_counter(); profile.sample_table(splits); times["sample_table_s"] = time.perf_counter() - t
from varstudent.data.validate import run_suite
t, c = time.perf_counter(), time.process_time()
result = run_suite(name, splits, classes, expected_layout(name, 0.2), 2.0)
# tables + all expectations (GX already imported)
times["suite_s"], times["suite_cpu_s"] = time.perf_counter() - t, time.process_time() - c
assert result.success, result.message()
t = time.perf_counter()
write_prepared(out, name, as_uint8(x_tr), y_tr, as_uint8(x_te), y_te, classes)
times["write_s"] = time.perf_counter() - t
print(json.dumps(times))
"""
# the whole `varstudent prepare` in-process, then its own peak resident memory (KiB on Linux)
WHOLE = r"""
import resource, sys
from varstudent.cli import app
app(sys.argv[1:], standalone_mode=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--raw-dir", default="data/raw")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        with tempfile.TemporaryDirectory() as tmp:
            parts = subprocess.run([sys.executable, "-c", PARTS, name, args.raw_dir, tmp],
                                   capture_output=True, text=True, check=True)
            row = {"dataset": name, **json.loads(parts.stdout.strip().splitlines()[-1])}
            started = time.perf_counter()
            whole = subprocess.run([sys.executable, "-c", WHOLE, "prepare", "--set", f"data.dataset={name}",
                                    "--set", f"data.raw_dir={args.raw_dir}", "--set", "tracking.enabled=false",
                                    "--out", tmp], capture_output=True, text=True, check=True)
            row["prepare_wall_s"] = time.perf_counter() - started
            row["prepare_peak_rss_mib"] = int(whole.stdout.strip().splitlines()[-1]) / 1024
            metrics = json.loads((Path(tmp) / "prepare" / "metrics.json").read_text())
            row["prepare_validation_s"] = metrics["validation_seconds"]
        row["gx_added_s"] = row["gx_import_s"] + row["suite_s"]
        # CPU seconds: what the same work takes on an uncontended core (the wall times depend on the load)
        row["gx_added_cpu_s"] = row["gx_import_cpu_s"] + row["suite_cpu_s"]
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
