"""The compact network as a flat list of layers with batch norm folded in: what the sparse and ONNX exports store.

Folding is exact algebra (up to float rounding): bn(W x + b) = (s W) x + s (b - mean) + beta with
s = gamma / sqrt(running_var + eps), one scale per output unit, so a weight that is zero stays zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from varstudent.nn.architectures import Net
from varstudent.prune import masked_layers


@dataclass
class FoldedLayer:
    kind: str  # "linear" or "conv"
    weight: torch.Tensor  # (out, in) or (out, in, k, k), batch norm folded in
    bias: torch.Tensor  # (out,)
    relu: bool
    pool: bool  # 2x2 max pool after the ReLU
    padding: int

    def spec(self) -> dict[str, Any]:
        """The layer's entry in an export spec (batch norm folded, so `bn` is false)."""
        spec = {"kind": self.kind, "in": int(self.weight.shape[1]), "out": int(self.weight.shape[0]),
                "bn": False, "relu": self.relu}
        if self.kind == "conv":
            spec.update(kernel=int(self.weight.shape[2]), padding=self.padding, pool=self.pool)
        return spec


def folded_layers(net: Net) -> list[FoldedLayer]:
    """The layers of a dense (compact) Net, each with its batch norm folded into its weight and bias."""
    assert not net.spec["variational"], "export the compact net, not the variational student"
    layers = []
    for layer in masked_layers(net):
        weight, bias = layer.weight.double(), layer.bias.double()  # fold in float64, round once
        if layer.bn is not None:
            bn = {k: v.double() for k, v in layer.bn.items()}
            scale = bn["weight"] / torch.sqrt(bn["running_var"] + bn["eps"])  # (out,)
            weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            bias = (bias - bn["running_mean"]) * scale + bn["bias"]
        spec = layer.spec
        layers.append(FoldedLayer(spec["kind"], weight.float(), bias.float(), bool(spec["relu"]),
                                  bool(spec.get("pool")), int(spec.get("padding", 0))))
    return layers


def export_spec(net: Net, layers: list[FoldedLayer]) -> dict[str, Any]:
    """The net's spec with the folded layers; the input index is stored as a tensor, not in the JSON."""
    spec = {k: v for k, v in net.spec.items() if k not in ("layers", "input_index")}
    spec.update(variational=False, layers=[layer.spec() for layer in layers],
                input_index=None)
    return spec
