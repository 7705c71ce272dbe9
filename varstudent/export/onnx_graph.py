"""The ONNX export: a hand-written graph of the compact net (batch norm folded), run with onnxruntime.

Written with onnx.helper from the folded layers rather than torch.onnx: the graph is a handful of standard
operators (Flatten, Gather for an MLP's kept inputs, Gemm, Conv, Relu, MaxPool), so it is exact, needs no
tracing, and no exporter dependency. Files: model.onnx (the graph with its weights; the spec is in its
metadata too) + onnx.json (spec, sha256). onnx and onnxruntime are imported inside these functions only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from varstudent.artifacts import FORMAT_VERSION, read_json
from varstudent.errors import ArtifactError
from varstudent.export.folded import export_spec, folded_layers
from varstudent.fileio import atomic_write_bytes, write_json
from varstudent.nn.architectures import Net

SPEC_FILE, MODEL_FILE = "onnx.json", "model.onnx"
OPSET, IR_VERSION = 17, 8  # onnxruntime >= 1.15 runs both
INPUT, OUTPUT = "input", "logits"


def onnx_model_bytes(net: Net) -> tuple[bytes, dict[str, Any]]:
    """The serialized ModelProto of the compact `net` (dynamic batch size) and its export spec."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = folded_layers(net)
    spec = export_spec(net, layers)
    nodes: list[Any] = []
    initializers = []

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        name = f"{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    x, flat = INPUT, False
    if layers[0].kind == "linear":
        x, flat = node("Flatten", [x], axis=1), True  # (B, C*H*W)
        if net.input_index is not None:
            initializers.append(numpy_helper.from_array(net.input_index.numpy().astype(np.int64), "input_index"))
            x = node("Gather", [x, "input_index"], axis=1)  # (B, kept inputs)
    for i, layer in enumerate(layers):
        initializers += [numpy_helper.from_array(layer.weight.numpy(), f"weight_{i}"),
                         numpy_helper.from_array(layer.bias.numpy(), f"bias_{i}")]
        if layer.kind == "linear":
            if not flat:
                x, flat = node("Flatten", [x], axis=1), True  # (B, C, H, W) -> (B, C*H*W)
            x = node("Gemm", [x, f"weight_{i}", f"bias_{i}"], transB=1)  # x W^T + b: (B, out)
        else:
            k = int(layer.weight.shape[2])
            x = node("Conv", [x, f"weight_{i}", f"bias_{i}"], kernel_shape=[k, k], pads=[layer.padding] * 4)
        if layer.relu:
            x = node("Relu", [x])
        if layer.pool:
            x = node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    nodes.append(helper.make_node("Identity", [x], [OUTPUT], name="output"))
    c, h, w = spec["input_shape"]
    graph = helper.make_graph(
        nodes, f"varstudent_{spec['arch']}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", spec["num_classes"]])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="varstudent",
                              doc_string="compact varstudent student; input float (B, C, H, W) in [0, 1]")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"varstudent_spec": json.dumps(spec)})
    onnx.checker.check_model(model)
    return model.SerializeToString(), spec


def write_onnx(net: Net, directory: Path) -> Path:
    blob, spec = onnx_model_bytes(net)
    atomic_write_bytes(directory / MODEL_FILE, blob)
    write_json(directory / SPEC_FILE, {"format_version": FORMAT_VERSION, "format": "onnx", "spec": spec,
                                       "file": MODEL_FILE, "opset": OPSET,
                                       "sha256": hashlib.sha256(blob).hexdigest()})
    return directory / MODEL_FILE


class OnnxModel(nn.Module):
    """An onnxruntime session behind the torch call: (B, C, H, W) float tensor -> logits (B, classes)."""

    def __init__(self, session: Any, spec: dict[str, Any], threads: int, stats: tuple[int, int]) -> None:
        super().__init__()
        self.session, self.spec, self.threads, self._stats = session, spec, threads, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])

    def weight_stats(self) -> tuple[int, int]:
        return self._stats


def load_onnx(directory: Path, threads: int = 0) -> OnnxModel:
    """Check model.onnx against onnx.json and open it with onnxruntime (CPU, `threads` intra-op threads)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    doc = read_json(directory / SPEC_FILE, "onnx export spec")
    if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION or doc.get("format") != "onnx" \
            or doc.get("file") != MODEL_FILE or "spec" not in doc:
        raise ArtifactError(f"{directory / SPEC_FILE}: not a varstudent onnx export spec "
                            f"(format_version {FORMAT_VERSION} expected)")
    from varstudent.nn.architectures import spec_io_problem

    problem = spec_io_problem(doc["spec"])
    if problem:
        raise ArtifactError(f"{directory / SPEC_FILE}: malformed spec ({problem})")
    path = directory / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"onnx export model not found: {path}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("sha256"):
        raise ArtifactError(f"{path}: checksum does not match its spec (file modified or truncated)")
    try:
        proto = onnx.load_from_string(blob)
        weights = [numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith("weight_")]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx and onnxruntime raise their own kinds on a bad model
        raise ArtifactError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    spec = doc["spec"]
    got_in, got_out = session.get_inputs()[0].shape[1:], session.get_outputs()[0].shape[1:]
    if list(got_in) != list(spec["input_shape"]) or list(got_out) != [spec["num_classes"]]:
        raise ArtifactError(f"{path}: the graph maps {got_in} to {got_out}, the spec says {spec['input_shape']} "
                            f"to [{spec['num_classes']}]")
    stats = (sum(w.size for w in weights), sum(int(np.count_nonzero(w)) for w in weights))
    return OnnxModel(session, spec, options.intra_op_num_threads, stats)
