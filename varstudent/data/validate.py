"""The data validation suite (Great Expectations 1.x, ephemeral context): the gate in front of training.

Edge module: Great Expectations is imported only inside `run_suite`. The suite checks three tables built
by `varstudent.data.profile` (per split, per image, per class); every expectation carries a description
(what it guards, in words) that the failure message and the HTML report show, with an offending example.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from varstudent.data.profile import Split, class_table, sample_table, split_table
from varstudent.data.sources import Layout
from varstudent.errors import DataError
from varstudent.fileio import atomic_write_bytes

REPORT_FILE, SUMMARY_FILE, FAILED_REPORT_FILE = "validation.html", "validation.json", "validation-failed.html"
# rows of each table named in failure examples
_INDEX_COLUMNS = {"splits": ["split"], "samples": ["split", "index"], "classes": ["split", "class"]}


@dataclass
class Check:
    table: str
    description: str
    expectation: str
    column: str
    success: bool
    unexpected: int | None = None
    example: str = ""


@dataclass
class SuiteResult:
    dataset: str
    checks: list[Check]
    counts: dict[str, int]
    seconds: float
    class_counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return all(c.success for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.success]

    def message(self) -> str:
        """Several lines: the first says what failed overall, then one line per failed expectation."""
        lines = [f"data validation failed for {self.dataset}: {len(self.failed)} of {len(self.checks)} "
                 "expectations failed"]
        for c in self.failed:
            count = f"{c.unexpected:,} unexpected; " if c.unexpected else ""
            lines.append(f"  - {c.description} [{c.expectation}({c.column})]: {count}{c.example}".rstrip("; :"))
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "success": self.success, "evaluated": len(self.checks),
                "failed": len(self.failed), "seconds": round(self.seconds, 3), "rows": self.counts,
                "class_counts": self.class_counts, "checks": [asdict(c) for c in self.checks]}

    def html(self) -> str:
        return render_html(self)

    def write(self, out_dir: Path, report_name: str = REPORT_FILE) -> Path:
        """The HTML report (and, for a pass, the JSON summary) into out_dir; returns the report's path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / report_name, self.html().encode())
        if report_name == REPORT_FILE:
            text = json.dumps(self.summary(), indent=2, default=str) + "\n"
            atomic_write_bytes(out_dir / SUMMARY_FILE, text.encode())
        return out_dir / report_name


def _expectations(gxe, layout: Layout, classes: list[int], max_class_ratio: float,
                  train_shape: str | None) -> dict[str, list]:
    """The suite, table by table. Each description says what the expectation guards."""
    shape = "x".join(map(str, layout.shape)) if layout.shape else train_shape
    known_counts = layout.n_train is not None and layout.n_test is not None
    splits = [
        gxe.ExpectColumnValuesToBeBetween(column="n_images", min_value=1,
                                          description="every split has images"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="n_images", column_B="n_labels",
                                            description="images and labels have equal counts"),
        gxe.ExpectColumnValuesToBeInSet(column="shape", value_set=[shape],
                                        description=f"images are {shape} (C x H x W)"),
        gxe.ExpectColumnValuesToBeInSet(column="pixel_dtype", value_set=[layout.pixel_dtype],
                                        description=f"pixels decode as {layout.pixel_dtype}"),
        gxe.ExpectColumnValuesToBeInSet(column="label_dtype", value_set=["int64"],
                                        description="labels are integers"),
    ]
    if known_counts:
        splits.append(gxe.ExpectColumnPairValuesToBeEqual(
            column_A="n_images", column_B="expected_rows",
            description=f"split sizes are the dataset's {layout.n_train:,} train / {layout.n_test:,} test"))
    samples = [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes,
                                        description=f"labels are class ids {classes[0]}..{classes[-1]}"),
        gxe.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=classes,
                                                 description="the label set is exactly the classes"),
        gxe.ExpectColumnValuesToBeInSet(column="nonfinite", value_set=[0],
                                        description="no NaN or infinite pixels"),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255,
                                          description="pixel values within 0..255 (minimum)"),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255,
                                          description="pixel values within 0..255 (maximum)"),
        gxe.ExpectColumnValuesToBeInSet(column="in_both_splits", value_set=[False],
                                        description="no image is in both train and test"),
        gxe.ExpectColumnValuesToBeInSet(column="label_conflict", value_set=[False],
                                        description="identical images carry the same label"),
    ]
    per_class = [
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1,
                                          description="every class occurs in every split"),
        gxe.ExpectColumnValuesToBeBetween(
            column="ratio_to_largest", min_value=1.0 / max_class_ratio, max_value=1.0,
            description=f"class balance: each class has at least 1/{max_class_ratio:g} of the largest class "
                        "(validate.max_class_ratio)"),
    ]
    return {"splits": splits, "samples": samples, "classes": per_class}


def _example(table: str, result: dict[str, Any]) -> str:
    """'e.g. train index 17 (label=10)' from a GX result, or the observed value for aggregate checks."""
    rows = result.get("partial_unexpected_index_list") or []
    if rows and isinstance(rows[0], dict):
        row = rows[0]
        keys = _INDEX_COLUMNS[table]
        where = " ".join(f"{row[k]}" if k == "split" else f"{k} {row[k]}" for k in keys if k in row)
        values = ", ".join(f"{k}={row[k]}" for k in row if k not in keys)
        return f"e.g. {where}" + (f" ({values})" if values else "")
    extra, missing = result.get("partial_unexpected_list") or [], result.get("partial_missing_list") or []
    if extra or missing:
        parts = ([f"unexpected {sorted(int(v) for v in extra)}"] if extra else []) + \
                ([f"missing {sorted(int(v) for v in missing)}"] if missing else [])
        return "; ".join(parts)
    observed = result.get("observed_value")
    return f"observed {observed}" if observed is not None else ""


def run_suite(dataset: str, splits: dict[str, Split], classes: list[int], layout: Layout,
              max_class_ratio: float) -> SuiteResult:
    """Build the tables, run every expectation, and collect the results (nothing is raised or written)."""
    started = time.perf_counter()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    expected_rows = {"train": layout.n_train, "test": layout.n_test}
    tables = {"splits": split_table(splits, expected_rows), "samples": sample_table(splits),
              "classes": class_table(splits, classes)}
    train_shape = "x".join(map(str, splits["train"][0].shape[1:])) if "train" in splits else None
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # they would spam stderr
    source = context.data_sources.add_pandas("varstudent")
    checks: list[Check] = []
    for table, expectations in _expectations(gxe, layout, classes, max_class_ratio, train_shape).items():
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}-{table}", expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 3,
                         "unexpected_index_column_names": _INDEX_COLUMNS[table]}
        run = definition.run(batch_parameters={"dataframe": tables[table]}, result_format=result_format)
        for r in run.results:
            kwargs = r.expectation_config.kwargs
            column = kwargs.get("column") or f"{kwargs.get('column_A')}, {kwargs.get('column_B')}"
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise DataError(f"data validation could not evaluate {r.expectation_config.type}({column}): "
                                f"{r.exception_info.get('exception_message')}")
            checks.append(Check(table=table, description=r.expectation_config.description or "",
                                expectation=r.expectation_config.type, column=column, success=bool(r.success),
                                unexpected=r.result.get("unexpected_count"),
                                example="" if r.success else _example(table, r.result)))
    counts = {name: int(len(y)) for name, (_, y) in splits.items()}
    class_counts = {name: tables["classes"].loc[tables["classes"]["split"] == name, "count"].tolist()
                    for name in splits}
    return SuiteResult(dataset, checks, counts, time.perf_counter() - started, class_counts)


def render_html(result: SuiteResult) -> str:
    """A self-contained HTML report: verdict, the per-split counts and one row per expectation."""
    esc = html.escape
    verdict = "passed" if result.success else f"FAILED ({len(result.failed)} of {len(result.checks)})"
    rows = "\n".join(
        f"<tr class={'ok' if c.success else 'bad'}><td>{'pass' if c.success else 'FAIL'}</td><td>{esc(c.table)}</td>"
        f"<td>{esc(c.description)}</td><td><code>{esc(c.expectation)}({esc(c.column)})</code></td>"
        f"<td>{'' if c.unexpected is None else f'{c.unexpected:,}'}</td><td>{esc(c.example)}</td></tr>"
        for c in result.checks)
    counts = ", ".join(f"{esc(k)} {v:,}" for k, v in result.counts.items())
    classes = "".join(f"<li>{esc(k)}: {esc(str(v))}</li>" for k, v in result.class_counts.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Data validation: {esc(result.dataset)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.bad{{background:#fdd}}.ok{{background:#efe}}</style>
</head><body>
<h1>Data validation of <code>{esc(result.dataset)}</code>: {esc(verdict)}</h1>
<p>Great Expectations suite over three tables (per split, per image, per class); {len(result.checks)}
expectations in {result.seconds:.2f} s. Samples: {counts}.</p>
<p>Class counts per split:</p><ul>{classes}</ul>
<table><tr><th>result</th><th>table</th><th>guards</th><th>expectation</th><th>unexpected</th><th>example</th></tr>
{rows}
</table></body></html>
"""
