"""How far can storing a network's parameters in reduced precision move its logits? A per-sample bound.

A value v stored in float16 (bfloat16) moves by at most r(v) = u |v| + eta, u = 2^-11 (2^-8) the unit
roundoff and eta = 2^-25 (0) half the spacing of float16's subnormals, where relative precision ends; a zero
stays zero. For one layer with stored weight W + dW, |dW| <= r(W), bias b + db, |db| <= r(b), and an input
h + dh whose error is bounded by e:

    |(W + dW)(h + dh) + b + db - (W h + b)| <= (|W| + r(W)) e + r(W) |h| + r(b)

and batch norm y = (z - mean) s + beta with s = gamma / sqrt(var + eps) stored rounded adds
|s| (|dz| + 1.5 u |z - mean| + r(mean)) + r(beta) (gamma and var each move s by u, var under a square root
by u / 2; second-order terms dropped there). ReLU and max pooling never enlarge an error, so the bound
passes through them as it is. Propagated through the layers from e = 0 at the input, this gives, for every
sample and logit, how far correct rounding can move it: the parity check of a reduced-precision export allows
exactly that (plus float32 slack), instead of one fixed tolerance that a long-trained student with larger
logits exceeds (a 200-epoch MNIST student's float16 export moved its logits by 0.06 with every prediction
unchanged; the old fixed 0.02 failed it). The bound is the worst case, every rounding error aligned: real
deviations are several times smaller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from varstudent.export.folded import folded_layers
from varstudent.nn.architectures import Net
from varstudent.prune import masked_layers

# (unit roundoff u, absolute floor eta) of each storage precision
ROUNDING = {"float16": (2.0 ** -11, 2.0 ** -25), "bfloat16": (2.0 ** -8, 0.0)}


def _apply(kind: str, x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    return F.linear(x, weight) if kind == "linear" else F.conv2d(x, weight, padding=padding)


def _half_step(v: torch.Tensor, step: float) -> torch.Tensor:
    """How far rounding to multiples of `step` moves each value: half a step, a zero not at all."""
    return (step / 2) * (v != 0).float()


def _per_unit(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-output-unit vector shaped to broadcast over (B, units) or (B, channels, H, W)."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


def rounding_bound(net: Net, x: torch.Tensor, precision: str, folded: bool, batch_size: int = 500,
                   steps: list[float] | None = None) -> torch.Tensor:
    """rounding_bound_batch over x in batches (a conv net's three passes per layer hold a lot)."""
    return torch.cat([rounding_bound_batch(net, x[i:i + batch_size], precision, folded, steps)
                      for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def rounding_bound_batch(net: Net, x: torch.Tensor, precision: str, folded: bool,
                         steps: list[float] | None = None) -> torch.Tensor:
    """(B, classes): the most each logit of `net` on x can move when its parameters are stored in `precision`.

    folded=True: the export stores batch norm folded into the weights and float32 biases (the sparse export);
    folded=False: every parameter, batch norm included, is rounded (compact_fp16 / compact_bf16).
    precision "quantized" (folded only): layer l's weights rounded to multiples of steps[l], each moving by at
    most half a step, biases too (quantized.py).
    """
    if precision == "quantized":
        assert folded and steps is not None, "quantized weights are the sparse export's: folded, with steps"
        u, eta = 0.0, 0.0
    else:
        u, eta = ROUNDING[precision]

    def r(v: torch.Tensor) -> torch.Tensor:
        return u * v.abs() + eta * (v != 0)
    if folded:
        layers = [(f.kind, f.weight, f.bias, None, f.relu, f.pool, f.padding) for f in folded_layers(net)]
    else:
        layers = [(lay.spec["kind"], lay.weight, lay.bias, lay.bn, lay.spec["relu"], bool(lay.spec.get("pool")),
                   int(lay.spec.get("padding", 0))) for lay in masked_layers(net)]
    h = x.float()
    if layers[0][0] == "linear":
        h = h.flatten(1)
        if net.input_index is not None:
            h = h.index_select(1, net.input_index)
    error = torch.zeros_like(h)
    for i, (kind, weight, bias, bn, relu, pool, padding) in enumerate(layers):
        if h.dim() == 4 and kind == "linear":
            h, error = h.flatten(1), error.flatten(1)
        moved = r(weight) if steps is None else _half_step(weight, steps[i])
        z = _apply(kind, h, weight, padding) + _per_unit(bias, h)
        error = _apply(kind, error, weight.abs() + moved, padding) + _apply(kind, h.abs(), moved, padding)
        if not folded:
            error = error + _per_unit(r(bias), z)
        elif steps is not None:  # quantized biases move by half their layer's step
            error = error + _per_unit(_half_step(bias, steps[i]), z)
        if bn is not None:
            scale = bn["weight"] / torch.sqrt(bn["running_var"] + bn["eps"])
            centred = z - _per_unit(bn["running_mean"], z)
            error = error + 1.5 * u * centred.abs() + _per_unit(r(bn["running_mean"]), z)
            error = _per_unit(scale.abs(), z) * error + _per_unit(r(bn["bias"]), z)
            z = centred * _per_unit(scale, z) + _per_unit(bn["bias"], z)
        if relu:
            z = torch.relu(z)
        if pool:
            z, error = F.max_pool2d(z, 2), F.max_pool2d(error, 2)
        h = z
    return error
