"""The tables the data validation suite checks, computed with numpy (no Great Expectations here).

- samples: one row per image: split, index (within its split), label, pixel_min/max/mean, nonfinite (count
  of NaN/inf pixels), content hash, in_both_splits (the same bytes occur in the other split), label_conflict
  (the same bytes occur elsewhere with another label).
- splits: one row per split: counts of images, labels and the expected count, image shape, dtypes.
- classes: one row per split and class: count and ratio to the split's largest class.

Everything is vectorised: the content hash is a 64-bit multiply-sum over the rows' 8-byte words (one integer
matrix-vector product), and hash matches are confirmed byte for byte, so a collision can never report an
overlap that is not there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

Split = tuple[np.ndarray, np.ndarray]  # x (N, C, H, W), y (N,)
# fixed odd multipliers: the hash must not change between runs (it is shown in the report)
_HASH_SEED = 0x5EED


def _rows(x: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, D) C-contiguous view (a copy only when x is not contiguous)."""
    return np.ascontiguousarray(x).reshape(len(x), int(np.prod(x.shape[1:])))  # -1 fails for N = 0


def content_hashes(x: np.ndarray) -> np.ndarray:
    """One uint64 per image from its raw bytes (dtype and shape included through the byte length)."""
    rows = _rows(x).view(np.uint8)
    pad = (-rows.shape[1]) % 8
    if pad:
        rows = np.pad(rows, ((0, 0), (0, pad)))
    words = rows.view(np.uint64)  # (N, D/8)
    mult = np.random.default_rng(_HASH_SEED).integers(0, 2**63, size=words.shape[1], dtype=np.uint64) * 2 + 1
    h = words @ mult  # wraps modulo 2**64, as intended
    return h ^ (h >> np.uint64(29))


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _overlap(splits: dict[str, Split], hashes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per split, a bool per image: do the same bytes occur in another split."""
    flags = {name: np.zeros(len(h), dtype=bool) for name, h in hashes.items()}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for ia in np.flatnonzero(np.isin(hashes[a], hashes[b])):
                for ib in np.flatnonzero(hashes[b] == hashes[a][ia]):
                    if _same_bytes(splits[a][0][ia], splits[b][0][ib]):
                        flags[a][ia] = flags[b][ib] = True
    return flags


def _conflicts(image: Callable[[int], np.ndarray], labels: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """A bool per image (all splits concatenated; `image(i)` returns image i): do the same bytes occur
    with another label."""
    conflict = np.zeros(len(hashes), dtype=bool)
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    starts = np.flatnonzero(np.r_[True, sorted_h[1:] != sorted_h[:-1]])
    ends = np.r_[starts[1:], len(sorted_h)]
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):  # groups of equal hashes only
        group = order[s:e]
        if len(set(labels[group].tolist())) < 2:
            continue
        for i in group:
            for j in group:
                if labels[i] != labels[j] and _same_bytes(image(i), image(j)):
                    conflict[i] = True
    return conflict


def _pixel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: min, max, mean over the finite pixels' range, and the count of NaN/inf pixels."""
    rows = _rows(x)
    if rows.shape[1] == 0:
        empty = np.full(len(rows), np.nan)
        return empty, empty, empty, np.zeros(len(rows), dtype=np.int64)
    if np.issubdtype(rows.dtype, np.integer):
        mean = rows.sum(axis=1, dtype=np.int64) / rows.shape[1]
        return rows.min(axis=1), rows.max(axis=1), mean, np.zeros(len(rows), dtype=np.int64)
    nonfinite = np.count_nonzero(~np.isfinite(rows), axis=1)
    # fmin/fmax skip NaN (an all-NaN row stays NaN); +-inf stays and fails the pixel range check
    return (np.fmin.reduce(rows, axis=1), np.fmax.reduce(rows, axis=1), rows.mean(axis=1), nonfinite)


def sample_table(splits: dict[str, Split]) -> pd.DataFrame:
    """One row per image of every split (images beyond the label count, or labels beyond the image count,
    are left out: the splits table reports the mismatch)."""
    import pandas as pd

    cut = {name: (x[:min(len(x), len(y))], y[:min(len(x), len(y))]) for name, (x, y) in splits.items()}
    hashes = {name: content_hashes(x) for name, (x, _) in cut.items()}
    in_both = _overlap(cut, hashes)
    parts = [x for x, _ in cut.values()]
    starts = np.cumsum([0] + [len(x) for x in parts])

    def image(i: int) -> np.ndarray:  # global index over the concatenated splits -> that image
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return parts[k][i - starts[k]]

    all_labels = np.concatenate([y for _, y in cut.values()]).astype(np.int64)
    conflict = _conflicts(image, all_labels, np.concatenate(list(hashes.values())))
    frames, offset = [], 0
    for name, (x, y) in cut.items():
        lo, hi, mean, nonfinite = _pixel_stats(x)
        frames.append(pd.DataFrame({
            "split": name, "index": np.arange(len(y)), "label": y.astype(np.int64),
            "pixel_min": lo.astype(np.float64), "pixel_max": hi.astype(np.float64),
            "pixel_mean": mean.astype(np.float64), "nonfinite": nonfinite,
            "hash": np.char.mod("%016x", hashes[name]) if len(y) else np.array([], dtype=str),
            "in_both_splits": in_both[name], "label_conflict": conflict[offset:offset + len(y)]}))
        offset += len(y)
    return pd.concat(frames, ignore_index=True)


def split_table(splits: dict[str, Split], expected_rows: dict[str, int | None]) -> pd.DataFrame:
    """One row per split: counts, the expected count (None = not known), image shape and dtypes."""
    import pandas as pd

    return pd.DataFrame([{
        "split": name, "n_images": len(x), "n_labels": len(y), "expected_rows": expected_rows.get(name),
        "shape": "x".join(str(d) for d in x.shape[1:]), "pixel_dtype": str(x.dtype), "label_dtype": str(y.dtype),
    } for name, (x, y) in splits.items()])


def class_table(splits: dict[str, Split], classes: list[int]) -> pd.DataFrame:
    """One row per split and class: its count and count / the split's largest class count."""
    import pandas as pd

    rows = []
    for name, (_, y) in splits.items():
        counts = np.array([np.count_nonzero(y == c) for c in classes])
        largest = max(int(counts.max()), 1) if len(counts) else 1
        rows += [{"split": name, "class": c, "count": int(n), "ratio_to_largest": n / largest}
                 for c, n in zip(classes, counts)]
    return pd.DataFrame(rows)
