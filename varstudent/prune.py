"""Pruning: zero the weights with log alpha >= threshold, then physically remove dead units.

A unit (row of a linear layer, filter of a conv) goes when
- nothing reads it: its column group in the next layer is all zero; or
- its incoming weights are all zero, so it outputs a constant c = relu(bn(bias)): when c == 0 it is
  simply dead; otherwise c is folded into the next layer's bias (exact for a linear next layer, and for
  a conv without padding, where a constant map stays constant).
Removing a unit removes its columns downstream, which can zero more rows, so this repeats to a fixed
point. Unused input features of an MLP are dropped too and recorded as the net's `input_index`.
The result is a plain dense Net whose predictions equal the masked student's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from varstudent.nn.architectures import Net, build_model
from varstudent.nn.variational import VariationalLayer


@dataclass
class _Layer:
    spec: dict[str, Any]
    weight: torch.Tensor  # (out, in) or (out, in, k, k)
    bias: torch.Tensor
    bn: dict[str, torch.Tensor] | None

    def constant_output(self) -> torch.Tensor:
        """What each unit outputs when its weights are all zero: relu(bn(bias)), per unit."""
        out = self.bias.clone()
        if self.bn is not None:
            bn = self.bn
            out = (out - bn["running_mean"]) / torch.sqrt(bn["running_var"] + bn["eps"]) * bn["weight"] \
                + bn["bias"]
        return torch.relu(out) if self.spec["relu"] else out


def masked_layers(model: Net, threshold: float | None = None) -> list[_Layer]:
    """Dense copies of every layer with the variational mask applied."""
    layers = []
    for block, spec in zip(model.blocks, model.spec["layers"]):
        op = block.op
        if isinstance(op, VariationalLayer):
            keep = op.keep_mask() if threshold is None else op.log_alpha < threshold
            weight = (op.weight * keep).detach().clone()
        else:
            weight = op.weight.detach().clone()
        bias = op.bias.detach().clone() if op.bias is not None else torch.zeros(weight.shape[0])
        bn = None
        if block.bn is not None:
            bn = {k: getattr(block.bn, k).detach().clone()
                  for k in ("weight", "bias", "running_mean", "running_var")}
            bn["eps"] = torch.tensor(block.bn.eps)
        layers.append(_Layer(copy.deepcopy(spec), weight, bias, bn))
    return layers


def _keep_units(layer: _Layer, keep: torch.Tensor) -> None:
    layer.weight, layer.bias = layer.weight[keep], layer.bias[keep]
    if layer.bn is not None:
        layer.bn = {k: (v if k == "eps" else v[keep]) for k, v in layer.bn.items()}
    layer.spec["out"] = int(keep.sum())


def _keep_inputs(layer: _Layer, n_prev: int, keep: torch.Tensor) -> None:
    """Drop the input groups (columns, or channel x H x W after a flatten) of removed upstream units."""
    shape = layer.weight.shape
    grouped = layer.weight.reshape(shape[0], n_prev, -1)[:, keep]  # (out, kept units, group size)
    new_in = int(keep.sum()) * grouped.shape[2] // (shape[2] * shape[3] if len(shape) == 4 else 1)
    layer.weight = grouped.reshape(shape[0], new_in, *shape[2:])
    layer.spec["in"] = new_in


def compact_layers(layers: list[_Layer], first_is_linear: bool) -> tuple[list[_Layer], torch.Tensor | None]:
    n_inputs = layers[0].weight.shape[1]
    input_index = torch.arange(n_inputs) if first_is_linear else None
    changed = True
    while changed:
        changed = False
        if input_index is not None:
            used = layers[0].weight.ne(0).any(0)
            if not used.all() and used.any():
                layers[0].weight, input_index = layers[0].weight[:, used], input_index[used]
                layers[0].spec["in"] = int(used.sum())
                changed = True
        for cur, nxt in zip(layers[:-1], layers[1:]):
            n = cur.weight.shape[0]
            grouped = nxt.weight.reshape(nxt.weight.shape[0], n, -1)  # (next out, units, group size)
            unread = grouped.ne(0).any(2).any(0).logical_not()
            silent = cur.weight.reshape(n, -1).ne(0).any(1).logical_not()
            const = cur.constant_output()
            foldable = silent & const.ne(0) & ~unread & (nxt.spec["kind"] == "linear" or
                                                           nxt.spec.get("padding", 0) == 0)
            remove = unread | (silent & const.eq(0)) | foldable
            if foldable.any():
                nxt.bias = nxt.bias + (grouped[:, foldable].sum(2) * const[foldable]).sum(1)
            placeholder = bool(remove.all())
            if placeholder:  # keep one unit so every layer has a shape; it was removable, so it gets cut off
                remove[0] = False
            if remove.any():
                keep = ~remove
                _keep_units(cur, keep)
                _keep_inputs(nxt, n, keep)
                changed = True
            if placeholder:  # its input is irrelevant and its effect is folded, zero or unread
                cur.weight[0] = 0
                nxt.weight.reshape(nxt.weight.shape[0], cur.weight.shape[0], -1)[:, 0] = 0
    return layers, input_index


def compact(model: Net, threshold: float | None = None) -> Net:
    """A physically smaller dense Net computing the same function as the masked `model` in eval mode."""
    layers, input_index = compact_layers(masked_layers(model, threshold),
                                         first_is_linear=model.spec["layers"][0]["kind"] == "linear")
    spec = copy.deepcopy(model.spec)
    spec.update(variational=False, layers=[layer.spec for layer in layers],
                input_index=input_index.tolist() if input_index is not None else None)
    net = build_model(spec)
    state = {}
    for i, layer in enumerate(layers):
        state[f"blocks.{i}.op.weight"], state[f"blocks.{i}.op.bias"] = layer.weight, layer.bias
        if layer.bn is not None:
            for k in ("weight", "bias", "running_mean", "running_var"):
                state[f"blocks.{i}.bn.{k}"] = layer.bn[k]
            state[f"blocks.{i}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if input_index is not None:
        state["input_index"] = input_index
    net.load_state_dict(state)
    return net.eval()


def layer_table(model: Net, threshold: float | None = None) -> list[dict[str, Any]]:
    """Per layer: shape, weights, nonzeros and sparsity % of the masked model."""
    rows = []
    for i, layer in enumerate(masked_layers(model, threshold)):
        total, nonzero = layer.weight.numel(), int(layer.weight.ne(0).sum())
        rows.append({"layer": i, "kind": layer.spec["kind"], "shape": list(layer.weight.shape),
                     "weights": total, "nonzero": nonzero,
                     "sparsity_pct": 100.0 * (1 - nonzero / total) if total else 0.0})
    return rows


def nonzero_weights(model: Net) -> int:
    return sum(row["nonzero"] for row in layer_table(model))
