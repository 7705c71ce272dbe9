"""Networks by name, dense or variational, described by a JSON-able spec.

Every network is a chain of blocks: op (linear or conv) -> [batch norm] -> [ReLU] -> [2x2 max pool].
The spec (a plain dict) is what artifacts store next to the weights, so a compacted network with
smaller layers is rebuilt from its own spec alone. Input layers adapt to the dataset's shape.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from varstudent.errors import ConfigError
from varstudent.nn.variational import Conv2dSVD, LinearSVD

# (out channels | "M" for a pool) of the VGG-like net of Sparse VD / Zagoruyko's CIFAR-10 baseline
VGG_LIKE_CONVS: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                          512, 512, 512, "M", 512, 512, 512, "M")
_MLP = re.compile(r"^mlp(-\d+)+$")


def _scale(n: int, width: float) -> int:
    return max(1, round(n * width))


def _conv(c_in: int, c_out: int, kernel: int, padding: int, pool: bool, bn: bool) -> dict[str, Any]:
    return {"kind": "conv", "in": c_in, "out": c_out, "kernel": kernel, "padding": padding,
            "pool": pool, "bn": bn, "relu": True}


def _linear(n_in: int, n_out: int, relu: bool, bn: bool = False) -> dict[str, Any]:
    return {"kind": "linear", "in": n_in, "out": n_out, "bn": bn, "relu": relu}


def _mlp(hidden: list[int], n_in: int, n_classes: int) -> list[dict[str, Any]]:
    sizes = [n_in, *hidden]
    layers = [_linear(a, b, relu=True) for a, b in zip(sizes[:-1], sizes[1:])]
    return [*layers, _linear(sizes[-1], n_classes, relu=False)]


def build_spec(arch: str, input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0,
               variational: bool = False, threshold: float = 3.0, dropout: float = 0.0,
               input_dropout: float = 0.0) -> dict[str, Any]:
    """The spec of architecture `arch` for inputs of shape (C, H, W). `input_dropout` / `dropout`: dropout rates
    on the input of the first layer / of every later layer while training (a layer's `dropout` key; absent = 0,
    so specs without dropout read as before)."""
    name, layers, flat_hw = _layers(arch, input_shape, num_classes, width)
    for i, layer in enumerate(layers):
        rate = input_dropout if i == 0 else dropout
        if rate > 0:
            layer["dropout"] = rate
    return {"arch": name, "input_shape": list(input_shape), "num_classes": num_classes,
            "variational": variational, "threshold": threshold, "flat_hw": flat_hw,
            "input_index": None, "layers": layers}


def _layers(arch: str, input_shape: tuple[int, int, int], num_classes: int,
            width: float) -> tuple[str, list[dict[str, Any]], list[int]]:
    """(the architecture's canonical name, its layers, the spatial size before the first linear layer)."""
    c, h, w = input_shape
    if arch == "lenet-300-100":
        arch = "mlp-300-100"
    if _MLP.match(arch):
        hidden = [_scale(int(n), width) for n in arch.split("-")[1:]]
        layers = _mlp(hidden, c * h * w, num_classes)
        flat_hw = [h, w]
    elif arch in ("lenet5", "vgg-like"):
        if arch == "lenet5":  # LeNet-5-Caffe: conv 20 (5x5) -> pool -> conv 50 (5x5) -> pool -> fc 500
            plan: list[Any] = [(_scale(20, width), 5, 0), "M", (_scale(50, width), 5, 0), "M"]
            fc, bn = [_scale(500, width)], False
        else:
            plan = [v if v == "M" else (_scale(v, width), 3, 1) for v in VGG_LIKE_CONVS]
            fc, bn = [_scale(512, width)], True
        layers, channels = [], c
        for item in plan:
            if item == "M":
                if h >= 2:  # small inputs (28x28) run out of pixels before the fifth pool
                    layers[-1]["pool"] = True
                    h, w = h // 2, w // 2
                continue
            out, kernel, pad = item
            h, w = h + 2 * pad - kernel + 1, w + 2 * pad - kernel + 1
            if h < 1 or w < 1:
                raise ConfigError(f"architecture {arch} needs larger inputs than {input_shape[1]}x"
                                  f"{input_shape[2]} (try an mlp)")
            layers.append(_conv(channels, out, kernel, pad, pool=False, bn=bn))
            channels = out
        flat_hw = [h, w]
        sizes = [channels * h * w, *fc]
        layers += [_linear(a, b, relu=True, bn=bn) for a, b in zip(sizes[:-1], sizes[1:])]
        layers.append(_linear(sizes[-1], num_classes, relu=False))
    else:
        raise ConfigError(f"unknown architecture '{arch}' (known: mlp-H1-H2-..., lenet-300-100, lenet5, vgg-like)")
    return arch, layers, flat_hw


class Block(nn.Module):
    def __init__(self, layer: dict[str, Any], variational: bool, threshold: float) -> None:
        super().__init__()
        self.kind = layer["kind"]
        conv = self.kind == "conv"
        if conv and variational:
            self.op: nn.Module = Conv2dSVD(layer["in"], layer["out"], layer["kernel"], layer["padding"],
                                           threshold=threshold)
        elif conv:
            self.op = nn.Conv2d(layer["in"], layer["out"], layer["kernel"], padding=layer["padding"])
        elif variational:
            self.op = LinearSVD(layer["in"], layer["out"], threshold=threshold)
        else:
            self.op = nn.Linear(layer["in"], layer["out"])
        self.bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(layer["out"]) if layer["bn"] else None
        self.relu = layer["relu"]
        self.pool = bool(layer.get("pool"))
        self.dropout = float(layer.get("dropout", 0.0))  # on this block's input, while training

    def columns_ready(self) -> bool:
        """Whether forward_columns computes this block: a plain linear layer outside training, with no forward
        hook on it or its op (forward_columns bypasses the module calls that run them)."""
        return self.kind == "linear" and type(self.op) is nn.Linear and self.bn is None and not self.training \
            and not any(self.hook_dicts())

    def hook_dicts(self) -> list[dict]:
        """The forward (pre-)hook registries of this block and its op: a registered hook must run."""
        return [self._forward_hooks, self._forward_pre_hooks, self.op._forward_hooks, self.op._forward_pre_hooks]

    def forward_columns(self, h: torch.Tensor) -> torch.Tensor:
        """(in, B) -> (out, B): the same affine map + ReLU as forward, on the transposed activations."""
        return affine_columns(self.op.weight, self.op.bias, h, self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = dropout(x, self.dropout)
        x = self.op(x)
        if self.bn is not None:
            x = self.bn(x)
        return relu_pool(x, self.relu, self.pool, fast=not self.training and not torch.is_grad_enabled())


def dropout(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Inverted dropout (each value kept with probability 1 - rate, scaled by 1 / (1 - rate)). On the CPU the
    mask comes from torch.rand: F.dropout's bernoulli_ took 1.7 ms for a (100, 1200) batch on 2 threads against
    0.6 ms this way, ~4 ms of every step of the MNIST teacher's three dropout layers."""
    if x.device.type != "cpu":
        return nn.functional.dropout(x, rate, training=True)
    keep = torch.rand_like(x) >= rate
    return x * keep * (1.0 / (1.0 - rate))


def affine_columns(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, relu: bool) -> torch.Tensor:
    """W (out, in) @ h (in, B) + bias, then ReLU: one linear layer on transposed activations (run_chain);
    `weight` may be a sparse CSR matrix."""
    h = torch.addmm(bias[:, None], weight, h)
    return torch.relu_(h) if relu else h  # h is addmm's fresh output


# the first layer of a pruned MLP: gathering its kept inputs (a copy) against running it on the span of inputs
# from the first kept one to the last (a view of the input), with zero columns for the dropped ones in between.
# At batch 256 on 2 threads the two cost the same where out * (zero columns) ~= 75 * kept (out 48 to 200, kept
# 300 to 600 of 784: 0.66x to 1.47x); the default MNIST student (96 units, 507 kept in a span of 682) is at 33
WIDEN_RATIO = 75


def widened_first_weight(weight: torch.Tensor, input_index: torch.Tensor) -> tuple[slice, torch.Tensor] | None:
    """(the span of inputs, the (out, span) weight with a zero column per dropped input in it), where that is
    the faster way to run the first layer than gathering the kept inputs (WIDEN_RATIO); None where the gather is."""
    out, kept = weight.shape
    if kept == 0:
        return None
    start, stop = int(input_index.min()), int(input_index.max()) + 1
    if out * (stop - start - kept) > WIDEN_RATIO * kept:
        return None
    wide = weight.new_zeros(out, stop - start)
    wide[:, input_index - start] = weight
    return slice(start, stop), wide


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) (floor mode), as the elementwise max of four strided views: the same values, but
    vectorized -- on this CPU build 1.2 ms against 10.6 ms for LeNet-5's (256, 19, 24, 24) conv1 output."""
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 1::2, 0::2]),
                         torch.maximum(x[..., 0::2, 1::2], x[..., 1::2, 1::2]))


def relu_pool(x: torch.Tensor, relu: bool, pool: bool, fast: bool) -> torch.Tensor:
    """ReLU, then 2x2 max pool. `fast` (inference without autograd, on the CPU) pools first with max_pool_2x2
    and applies ReLU to a quarter of the values: the same numbers, max commutes with ReLU. With autograd on
    (training, or gradients taken in eval mode) F.max_pool2d runs: its gradient goes to one element of a tied
    window, max_pool_2x2's would be split."""
    if pool and fast and x.device.type == "cpu":
        x = max_pool_2x2(x)
        return torch.relu_(x) if relu else x  # x is max_pool_2x2's fresh output
    if relu:
        x = torch.relu(x)
    return nn.functional.max_pool2d(x, 2) if pool else x


class Net(nn.Module):
    """A chain of blocks built from a spec; `input_index` selects the input features a pruned MLP keeps."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(Block(layer, spec["variational"], spec["threshold"])
                                    for layer in spec["layers"])
        index = spec.get("input_index")
        self.register_buffer("input_index", torch.tensor(index, dtype=torch.long) if index is not None
                             else None)
        # a plain linear chain (an MLP without variational layers or batch norm) runs inference from a cached
        # ColumnPlan: (what it was made from, the plan)
        self._plain_linear = not spec["variational"] \
            and all(lay["kind"] == "linear" and not lay["bn"] for lay in spec["layers"])
        self._plan: tuple[list, ColumnPlan] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> logits (B, classes)
        if self._plain_linear and not self.training and not torch.is_grad_enabled():
            plan = self._column_plan()
            if plan is not None:
                return plan.run(x)
        return run_chain(x, self.blocks, self.input_index)

    def train(self, mode: bool = True) -> Net:
        self._plan = None  # eval() starts from the weights as they are, even after writes through .data
        return super().train(mode)

    def _column_plan(self) -> ColumnPlan | None:
        """The plan of this MLP's current layers, made again when a block, op, parameter or the input index is
        replaced, moved (a new address) or changed in place (a new _version; writes through `.data` bump none:
        call eval() after them). None, so that the modules run, where a forward hook is registered or an op is
        no plain nn.Linear with weight and bias (e.g. parametrized)."""
        if _global_forward_hooks or _global_forward_pre_hooks:
            return None
        if self._plan is not None:
            (n_blocks, hooks, watched), plan = self._plan
            if len(self._modules["blocks"]) == n_blocks and not any(hooks) and all(
                    owner.get(key) is held and (stamp is None or (held.data_ptr(), held._version) == stamp)
                    for owner, key, held, stamp in watched):
                return plan
        blocks = self._modules["blocks"]
        watched: list = []
        hooks = []
        layers = []
        for key, block in blocks._modules.items():
            op = block._modules.get("op")
            weight, bias = (op._parameters.get("weight"), op._parameters.get("bias")) if op is not None else (None,) * 2
            block_hooks = block.hook_dicts() if op is not None else []
            if type(op) is not nn.Linear or weight is None or bias is None or any(block_hooks):
                return None
            hooks += block_hooks
            watched += [(blocks._modules, key, block, None), (block._modules, "op", op, None),
                        (block.__dict__, "relu", block.relu, None), (op._parameters, "weight", weight, _stamp(weight)),
                        (op._parameters, "bias", bias, _stamp(bias))]
            layers.append((weight.detach(), bias.detach(), block.relu))
        index = self._buffers.get("input_index")
        watched.append((self._buffers, "input_index", index, None if index is None else _stamp(index)))
        plan = ColumnPlan.of(layers, index)
        # an inference tensor keeps no version counter: its plan is made for this call only
        self._plan = None if any(stamp == _NO_VERSION for *_, stamp in watched) \
            else ((len(blocks), hooks, watched), plan)
        return plan


_NO_VERSION = (-1, -1)


def _stamp(t: torch.Tensor) -> tuple[int, int]:
    return _NO_VERSION if torch.is_inference(t) else (t.data_ptr(), t._version)


class ColumnPlan:
    """Inference of a plain linear chain as a list of (weight, bias, relu) on transposed activations, with no
    module in between: on the default compact MNIST student the modules' own calls took ~37 of 76 us at batch 1
    (run_chain through Block.forward_columns), which the plan does not spend.

    The first layer of a pruned MLP either gathers its kept inputs (`inputs` an index) or, where faster
    (widened_first_weight), runs on the span of inputs that holds them (`inputs` a slice: a view, no copy)."""

    def __init__(self, inputs: torch.Tensor | slice | None,
                 layers: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        self.inputs, self.layers = inputs, layers

    @classmethod
    def of(cls, layers: list[tuple[torch.Tensor, torch.Tensor, bool]], index: torch.Tensor | None) -> ColumnPlan:
        first = layers[0][0]
        if index is not None and first.layout == torch.strided:  # a CSR first layer keeps the gather
            widened = widened_first_weight(first, index)
            if widened is not None:
                span, wide = widened
                return cls(span, [(wide, *layers[0][1:]), *layers[1:]])
        return cls(index, layers)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        if isinstance(self.inputs, slice):
            h = h[:, self.inputs]
        elif self.inputs is not None:
            h = h.index_select(1, self.inputs)
        h = h.t()
        for weight, bias, relu in self.layers:
            h = affine_columns(weight, bias, h, relu)
        return h.t().contiguous()


def run_chain(x: torch.Tensor, blocks, input_index: torch.Tensor | None) -> torch.Tensor:
    """Apply a chain of blocks (each with a `kind`), flattening before the first linear one; shared by Net
    and the exports that rebuild the chain with other layer types.

    A linear tail whose blocks are all `columns_ready` (inference, plain weights) runs on the transposed
    activations, W (out, in) @ H (in, B): the same arithmetic, but the BLAS then splits the small compact
    layers over threads (95x509 at batch 256: 0.16 ms on 1 or 2 threads as x @ W^T, 0.10-0.12 ms on 2 as
    W @ H). Interleaved A/B at batch 256 on 2 threads: the default compact student +11 % samples/s, the
    teacher +4 % (README, "Bytes and speed of the exports").
    """
    if blocks[0].kind == "linear":
        x = x.flatten(1)  # (B, C*H*W)
        if input_index is not None:
            x = x.index_select(1, input_index)  # (B, kept inputs)
    chain = list(blocks)  # slicing an nn.ModuleList builds a new module: ~20 us a call
    for i, block in enumerate(chain):
        if block.kind == "linear":
            x = x.flatten(1)
            tail = chain[i:]
            if all(b.columns_ready() for b in tail):
                h = x.t()
                for tail_block in tail:
                    h = tail_block.forward_columns(h)
                return h.t().contiguous()
        x = block(x)
    return x


def spec_io_problem(spec: Any) -> str | None:
    """What is wrong with a loaded spec's input shape or class count, or None. Specs come from files: a model
    built from one whose `input_shape` is not three positive integers fails in places far from the cause."""
    if not isinstance(spec, dict):
        return f"the spec is a {type(spec).__name__}, not an object"
    shape, classes = spec.get("input_shape"), spec.get("num_classes")
    def positive_int(value: Any, most: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most
    if not (isinstance(shape, list) and len(shape) == 3 and all(positive_int(d, 1 << 16) for d in shape)):
        return f"input_shape {shape!r} is not [channels, height, width] of positive integers"
    if not positive_int(classes, 1 << 20):
        return f"num_classes {classes!r} is not a positive integer"
    return None


def build_model(spec: dict[str, Any]) -> Net:
    return Net(spec)


def weight_count(spec: dict[str, Any]) -> int:
    """Weights of the layers (biases and batch-norm excluded), the count compression ratios divide."""
    total = 0
    for layer in spec["layers"]:
        k = layer["kernel"] ** 2 if layer["kind"] == "conv" else 1
        total += layer["in"] * layer["out"] * k
    return total
