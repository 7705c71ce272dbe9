"""Self-describing model artifacts: NAME.safetensors (weights) + NAME.json (spec, tensor shapes, sha256).

Never pickle: one call, `load_model`, rebuilds the network from the spec and checks every tensor
against it, so a truncated, tampered or mismatched artifact is a clear error, not a silent wrong model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from varstudent.errors import ArtifactError
from varstudent.fileio import atomic_write_bytes, write_json
from varstudent.nn.architectures import Net, build_model, spec_io_problem

FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path, what: str, kind: type = dict) -> Any:
    """The JSON document at `path`, which must be a `kind` (an object, or a list for histories): a file that
    parses as something else (say `[]` for metrics) is damaged, and reading fields from it would crash."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{what} is not valid JSON: {path}") from None
    if not isinstance(doc, kind):
        expected = "an object" if kind is dict else f"a {kind.__name__}"
        raise ArtifactError(f"{what} is not {expected} but {type(doc).__name__}: {path} (damaged?)")
    return doc


def write_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor], doc: dict[str, Any],
                  one_line: bool = False) -> Path:
    """Write NAME.safetensors, then NAME.json = doc + format_version, tensor shapes and sha256.

    The JSON goes last: its presence marks a complete artifact. `one_line` drops its indentation.
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    full = {"format_version": FORMAT_VERSION, **doc, "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    # the JSON's digest rides in the weights file's header, and the weights' sha256 in the JSON: an edit to
    # either file (a layer's activation, a recorded lineage) no longer matches the other
    blob = save(tensors, metadata={DOC_DIGEST_KEY: _doc_digest(full)})
    weights = directory / f"{name}.safetensors"
    atomic_write_bytes(weights, blob)
    write_json(directory / f"{name}.json", {**full, "sha256": hashlib.sha256(blob).hexdigest()},
               indent=None if one_line else 2)
    return weights


DOC_DIGEST_KEY = "varstudent_json_sha256"


def _doc_digest(doc: dict[str, Any]) -> str:
    """sha256 of the JSON document without its own `sha256` field, in one canonical serialization."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _header_metadata(blob: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian header length, then the JSON header."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + size])
        metadata = header.get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}  # the safetensors reader reports an unreadable file
    return metadata if isinstance(metadata, dict) else {}


def read_tensors(directory: Path, name: str, what: str = "model") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """NAME.json and the tensors of NAME.safetensors, after checking the version and the sha256."""
    from safetensors.torch import load

    directory = Path(directory)  # a str folder from library users

    doc = read_json(directory / f"{name}.json", f"{what} spec")
    weights = directory / f"{name}.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{what} weights not found: {weights}")
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory / (name + '.json')}: not a varstudent {what} spec "
                            f"(format_version {FORMAT_VERSION} expected)")
    blob = weights.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("sha256"):
        raise ArtifactError(f"{weights}: checksum does not match its spec (file modified or truncated)")
    recorded = _header_metadata(blob).get(DOC_DIGEST_KEY)
    if recorded is not None and recorded != _doc_digest(doc):  # files written before the digest have none
        raise ArtifactError(f"{directory / (name + '.json')}: changed after it was written (its digest in "
                            f"{weights.name} does not match)")
    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises several kinds (and versions differ) on corrupt input
        raise ArtifactError(f"{weights}: unreadable safetensors file ({exc})") from None
    return doc, tensors


def save_model(model: Net, directory: Path, name: str = "model", meta: dict[str, Any] | None = None,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Write the model's spec and weights; `storage_dtype` (e.g. float16) stores floating tensors smaller.

    A reduced-precision model loads back as float32 (the values rounded once, when saved).
    """
    tensors = {k: v.to(storage_dtype) if storage_dtype is not None and v.is_floating_point() else v
               for k, v in model.state_dict().items()}
    doc: dict[str, Any] = {"spec": model.spec, "meta": meta or {}}
    if storage_dtype is not None:
        doc["storage_dtype"] = str(storage_dtype).removeprefix("torch.")
    return write_tensors(directory, name, tensors, doc)


def load_model(directory: Path, name: str = "model", device: str | torch.device = "cpu") -> Net:
    directory = Path(directory)
    doc, tensors = read_tensors(directory, name)
    if "spec" not in doc:
        raise ArtifactError(f"{directory / (name + '.json')}: not a varstudent model spec "
                            f"(format_version {FORMAT_VERSION} expected)")
    weights = directory / f"{name}.safetensors"
    problem = spec_io_problem(doc["spec"])
    if problem:
        raise ArtifactError(f"{directory / (name + '.json')}: malformed spec ({problem})")
    try:
        with torch.device("meta"):  # shapes only: a crafted spec cannot allocate anything before it is checked
            skeleton = build_model(doc["spec"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{directory / (name + '.json')}: malformed spec ({exc!r})") from None
    expected = skeleton.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{weights}: tensors do not match the spec (missing: {missing[:3]}, "
                            f"unexpected: {extra[:3]})")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ArtifactError(f"{weights}: tensor {key} has shape {tuple(tensors[key].shape)}, the spec "
                                f"says {tuple(value.shape)}")
    model = build_model(doc["spec"])  # every parameter now has the size of a tensor the file holds
    model.load_state_dict(tensors)  # copies into float32 parameters: reduced-precision storage loads as float32
    return model.to(device).eval()
