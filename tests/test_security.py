"""No code path unpickles anything: models are safetensors + JSON, YAML is read safely.

An AST scan of the project's code (the library, the KFP components and pipelines when present, the
benchmarks) for the calls that would run arbitrary code from a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("varstudent", "components", "pipelines", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}


def _name(node: ast.AST) -> str:
    """'torch.load' for the call target torch.load(...), '' when not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_uses(source: str) -> list[str]:
    """What in `source` could deserialize code: pickle-family imports/calls, torch.load without
    weights_only=True, numpy loads with allow_pickle=True, yaml.load without a safe loader."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            target = _name(node.func)
            tail = target.rsplit(".", 1)[-1]
            weights_only = _keyword(node, "weights_only")
            allow_pickle = _keyword(node, "allow_pickle")
            if target.split(".")[0] in UNSAFE_MODULES:
                found.append(f"line {node.lineno}: {target}()")
            elif target == "torch.load":
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
            elif target in ("np.load", "numpy.load") and isinstance(allow_pickle, ast.Constant) and allow_pickle.value:
                found.append(f"line {node.lineno}: {target}(allow_pickle=True)")
            elif target in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") or tail == "unsafe_load":
                loader = _keyword(node, "Loader")
                if tail != "load" or not (loader is not None and "Safe" in _name(loader)):
                    found.append(f"line {node.lineno}: {target} without a safe loader")
    return found


def test_the_scanner_finds_each_unsafe_pattern() -> None:
    bad = ("import pickle\nfrom cloudpickle import loads\nimport torch, numpy as np, yaml\n"
           "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
           "yaml.load(open('p.yaml'))\njoblib.load('m.joblib')\n")
    lines = [int(f.split(":")[0].removeprefix("line ")) for f in unsafe_uses(bad)]
    assert lines == [1, 2, 4, 5, 6, 7, 8], unsafe_uses(bad)  # every line but the harmless import
    safe = ("import torch, numpy as np, yaml\ntorch.load('m.pt', weights_only=True)\nnp.load('a.npy')\n"
            "yaml.safe_load('a: 1')\nyaml.load('a: 1', Loader=yaml.SafeLoader)\n")
    assert unsafe_uses(safe) == []


def test_no_project_code_can_unpickle() -> None:
    files = [p for folder in SCANNED if (REPO / folder).is_dir() for p in sorted((REPO / folder).rglob("*.py"))]
    assert any(p.parts[-2] == "varstudent" for p in files)  # the scan really ran over the library
    problems = {str(p.relative_to(REPO)): found for p in files if (found := unsafe_uses(p.read_text()))}
    assert problems == {}
