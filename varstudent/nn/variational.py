"""Sparse variational dropout layers (Molchanov, Ashukha, Vetrov, ICML 2017).

Each weight has a mean theta and a log variance log sigma^2; log alpha = log sigma^2 - log theta^2 is the
per-weight dropout rate. Training uses the local reparameterization trick: sample the pre-activations,
not the weights, with mean op(x, theta) and variance op(x^2, sigma^2). At evaluation, weights whose
log alpha >= threshold are zero and the rest act as a plain dense layer.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from varstudent.nn.kernels import (
    keep_index,
    kept_grad,
    kept_matmul,
    kept_products_kernel,
    transposed,
    vd_kl,
    vd_step,
    vd_step_grads,
    vd_step_kernel,
    vdkl_kernel,
)

# -KL(q || log-uniform prior) ~= K1 * sigmoid(K2 + K3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - K1
# (Molchanov et al. 2017, eq. 14; the fit is accurate to 1e-2 over all log alpha).
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLIP = 8.0  # log alpha is clipped to [-8, 8] as in the reference code
LOG_SIGMA2_INIT = -10.0  # starts every weight almost deterministic
VAR_EPS = 1e-8  # keeps sqrt(var) differentiable where x^2 * sigma^2 == 0
# train_clip on the CPU: a layer keeping at most this share of its weights computes the mean's two products over
# the kept ones alone (vdkl.c, kept_matmul / kept_grad); on 2 cores they break even with the dense ones near 20 %
KEPT_PRODUCTS_BELOW = 0.1


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(q(w | theta, alpha) || p(w)) per weight: >= 0, decreasing in log alpha, -> 0 as log alpha -> inf."""
    # -(K1 sigmoid(z) - 0.5 softplus(-log alpha) - K1), with K1 - K1 sigmoid(z) written K1 sigmoid(-z): the
    # difference cancels in float32 near the upper clip, in the value and in its gradient
    return KL_K1 * torch.sigmoid(-(KL_K2 + KL_K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)


class _LayerKL(torch.autograd.Function):
    """(scale * KL, KL) for one layer, KL = sum of kl_approx(log alpha(weight, log_sigma2)), with a
    hand-written backward through the first output (the second is a detached copy for reports).

    Same value and gradient as autograd through `kl_approx`, much faster: the KL touches every weight on
    every step, and autograd's chain of ~25 elementwise kernels was the largest cost of a CPU distillation
    epoch. On the CPU a fused C kernel (kernels.py) does it in one pass on all threads, writing the gradients
    already times `scale` (the term's loss weight): where the scaled KL is added straight into the loss, as
    `weighted_kl` lets the student loss do, the gradient arriving here is exactly 1 and the backward returns
    the kernel's tensors untouched - no extra pass to scale them. Elsewhere, or without a compiler, the
    PyTorch code below (about half autograd's time) runs. scale == 0 computes the value only. Weights with
    log alpha >= grad_below get no gradient (`distill.train_clip`: pruned in training; math.inf = none); the
    value still counts them.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, log_sigma2: torch.Tensor, scale: float,
                grad_below: float = math.inf) -> tuple[torch.Tensor, torch.Tensor]:
        with_grad = scale != 0 and (weight.requires_grad or log_sigma2.requires_grad)
        ctx.with_grad = with_grad
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and vdkl_kernel() is not None:
            # one fused C pass computes the value and both gradients
            kl_sum, grad_w, grad_s = vd_kl(weight.detach().contiguous(), log_sigma2.detach().contiguous(),
                                           LOG_ALPHA_CLIP, scale, with_grad, grad_below)
            ctx.fused = True
            # kept as attributes, not saved tensors: backward hands them on and drops its own reference, so
            # autograd can add the layer's data gradient into them in place instead of into a new tensor
            ctx.kernel_grads = (grad_w, grad_s)
            kl = torch.tensor(kl_sum, dtype=weight.dtype)
            ctx.mark_non_differentiable(kl)
            return kl * scale, kl
        ctx.fused = False
        w2 = (weight * weight).add_(1e-8)
        log_alpha = torch.log(w2).neg_().add_(log_sigma2)
        unclipped = log_alpha.abs() < LOG_ALPHA_CLIP  # the clip passes no gradient
        if grad_below < LOG_ALPHA_CLIP:  # nor does a weight pruned in training
            unclipped &= log_alpha < grad_below
        log_alpha.clamp_(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)
        # sigmoid(z) and sigmoid(-z), z = K2 + K3 log alpha, from one exp, as in vdkl.c (no 1 - sigmoid)
        sig_neg = torch.exp(log_alpha * -KL_K3 - KL_K2)
        sig = sig_neg.add(1).reciprocal_()
        sig_neg.mul_(sig)
        exp_neg = torch.exp(log_alpha.neg_())  # exp(-log alpha); softplus(-a) = log1p(exp(-a))
        kl = 0.5 * torch.log1p(exp_neg).sum() + KL_K1 * sig_neg.sum()
        ctx.scale = scale
        if with_grad:  # the backward needs only sigmoid(z) * sigmoid(-z): one saved tensor, not two
            ctx.save_for_backward(weight, w2, sig.mul_(sig_neg), exp_neg, unclipped)
        ctx.mark_non_differentiable(kl)
        return kl * scale, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                     None, None]:
        if not ctx.with_grad:
            return None, None, None, None
        if ctx.fused:  # CPU: a 0-d gradient is read without a device sync
            if not hasattr(ctx, "kernel_grads"):
                raise RuntimeError("a second backward through the same fused VD KL (retain_graph): its gradients "
                                   "were handed on by the first; set VARSTUDENT_NO_KERNELS=1 for the PyTorch path")
            grad_w, grad_s = ctx.kernel_grads
            del ctx.kernel_grads
            if grad.item() != 1.0:
                grad_w, grad_s = grad_w * grad, grad_s * grad
            return grad_w, grad_s, None, None
        weight, w2, sig_product, exp_neg, unclipped = ctx.saved_tensors
        # dKL/d log alpha = -K1 K3 sigmoid(z) sigmoid(-z) - 0.5 sigmoid(-log alpha)
        d_log_alpha = (sig_product * -(KL_K1 * KL_K3)).sub_((exp_neg / (exp_neg + 1)).mul_(0.5))
        d_log_alpha.mul_(unclipped).mul_(grad * ctx.scale)
        # log alpha = log_sigma2 - log(w^2 + eps): d/d log_sigma2 = 1, d/dw = -2w / (w^2 + eps)
        return d_log_alpha * weight * -2 / w2, d_log_alpha, None, None


def _lrt_sample(x: torch.Tensor, mean_weight: torch.Tensor, sigma2: torch.Tensor, bias: torch.Tensor | None,
                kept: tuple | None = None) -> tuple[torch.Tensor, ...]:
    """The local reparameterization draw of a linear layer, mean + sqrt(x^2 sigma^2^T + eps) * noise, with the
    noise drawn last as in `VariationalLayer.forward`: (output, x^2, std, noise), the last three for the backward.
    kept = (x^T, keep_index(...)): the mean's product runs over the kept weights only (train_clip, sparse)."""
    x2 = x * x
    mean = F.linear(x, mean_weight, bias) if kept is None else kept_matmul(kept[0], mean_weight, kept[1], bias)
    std = torch.mm(x2, sigma2.t()).add_(VAR_EPS).sqrt_()
    noise = torch.randn_like(mean)
    return mean.addcmul_(std, noise), x2, std, noise


def _lrt_grads(needs_input_grad: tuple[bool, ...], grad: torch.Tensor, x: torch.Tensor, x2: torch.Tensor,
               mean_weight: torch.Tensor, sigma2: torch.Tensor, std: torch.Tensor, noise: torch.Tensor,
               kept: tuple | None = None) -> tuple[torch.Tensor | None, ...]:
    """The backward of `_lrt_sample` for (x, weight, log_sigma2, bias): grad_x, grad^T x (the weight's, before
    any train_clip mask; with `kept` as in _lrt_sample, at the kept entries only and 0 elsewhere), grad_var^T x^2
    (log_sigma2's before the factor sigma^2) and grad_b; None where not needed. d out / d var = noise / (2 std)
    is computed in noise's memory: a second backward through the node (retain_graph) therefore fails autograd's
    in-place check rather than computing with a changed noise."""
    grad_var = noise.div_(std).mul_(grad).mul_(0.5)
    grad_x = None
    if needs_input_grad[0]:  # through the mean, and through x^2 in the variance: 2x (grad_var sigma^2)
        grad_x = torch.mm(grad, mean_weight).addcmul_(torch.mm(grad_var, sigma2), x, value=2.0)
    grad_w = None
    if needs_input_grad[1]:
        grad_w = torch.mm(grad.t(), x) if kept is None else kept_grad(grad, kept[0], kept[1], mean_weight.shape)
    grad_s = torch.mm(grad_var.t(), x2) if needs_input_grad[2] else None
    grad_b = grad.sum(0) if needs_input_grad[3] else None
    return grad_x, grad_w, grad_s, grad_b


class _LinearLRT(torch.autograd.Function):
    """A LinearSVD training forward, mean + sqrt(x^2 sigma^2^T + eps) * noise, with a hand-written backward.

    The same value and gradients as autograd through `VariationalLayer.forward` (tests compare them, and the
    noise is drawn at the same point, so seeded runs match), in fewer, partly in-place passes: autograd
    records ~12 ops per layer and allocates each one's output and gradient. The CPU path where the C kernels
    are not built (no compiler, VARSTUDENT_NO_KERNELS=1); with them `_LinearVDStep` runs instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, log_sigma2: torch.Tensor, bias: torch.Tensor | None,
                kept: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        # train_clip: the mean uses `kept` (the weight, zero where pruned) and the weight's gradient is masked by
        # `keep` here, in place, instead of through an autograd product
        sigma2 = torch.exp(log_sigma2)
        mean_weight = weight if kept is None else kept
        out, x2, std, noise = _lrt_sample(x, mean_weight, sigma2, bias)
        ctx.save_for_backward(x, x2, mean_weight, sigma2, std, noise, keep)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, x2, mean_weight, sigma2, std, noise, keep = ctx.saved_tensors
        grad_x, grad_w, grad_s, grad_b = _lrt_grads(ctx.needs_input_grad, grad, x, x2, mean_weight, sigma2, std,
                                                    noise)
        if grad_w is not None and keep is not None:
            grad_w.mul_(keep)
        if grad_s is not None:
            grad_s.mul_(sigma2)
        return grad_x, grad_w, grad_s, grad_b, None, None


class _LinearVDStep(torch.autograd.Function):
    """A LinearSVD training forward and the layer's KL in one node: (output, KL), CPU with the C kernels.

    On 2 CPU cores a pass over the 500x784 layer's weights can cost as much as one of its matrix products once
    the caches are cold, and a step made seven of them around the four products (exp, the keep mask, the KL, the
    mask's float copy and product, the sigma^2 product, and autograd's sums of the KL and data gradients).
    Here there are two: `vd_step` before the products (sigma^2, the KL and its derivative, the train_clip
    mask) and `vd_step_grads` after them, which adds the KL's gradient - times the KL output's incoming
    gradient, i.e. its loss weight - into the data gradients and masks them. `weighted_kl` takes the KL output
    from the layer (VariationalLayer.take_step_kl) instead of computing it again. Same values and gradients
    as the generic path (tests compare them; the noise is drawn at the same point). Without the layer's
    `kl_in_forward` (a loss with no KL term) the KL output is a constant 0 and is not offered to `weighted_kl`.
    Under train_clip a layer that keeps at most KEPT_PRODUCTS_BELOW of its weights computes the mean's two
    products, x kept^T and grad^T x, over the kept weights alone (vdkl.c: kept_matmul, kept_grad); the variance's
    products stay dense, as every weight's variance still trains.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, log_sigma2: torch.Tensor, bias: torch.Tensor | None,
                layer: VariationalLayer, token: object) -> tuple[torch.Tensor, torch.Tensor]:
        threshold = layer.threshold if layer.train_clip else None
        kl_sum, sigma2, dkl, kept, keep = vd_step(weight.detach(), log_sigma2.detach(), LOG_ALPHA_CLIP,
                                                  layer.kl_grad_below, threshold, layer.kl_in_forward)
        mean_weight = weight if kept is None else kept
        index = None
        cpu_bias = bias is None or (bias.device.type == "cpu" and bias.dtype == torch.float32
                                    and bias.is_contiguous())
        if keep is not None and KEPT_PRODUCTS_BELOW > 0 and cpu_bias and kept_products_kernel() is not None:
            index = keep_index(keep, int(KEPT_PRODUCTS_BELOW * keep.numel()))
        sparse = None if index is None else (transposed(x), index)
        out, x2, std, noise = _lrt_sample(x, mean_weight, sigma2, bias, sparse)
        ctx.save_for_backward(x, x2, weight, mean_weight, sigma2, std, noise, dkl, keep,
                              *(sparse[0], *sparse[1]) if sparse else (None, None, None))
        ctx.layer, ctx.token = weakref.ref(layer), token
        kl = torch.tensor(kl_sum, dtype=weight.dtype)
        if dkl is None:
            ctx.mark_non_differentiable(kl)
        return out, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, grad_kl: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, x2, weight, mean_weight, sigma2, std, noise, dkl, keep, x_t, start, col_index = ctx.saved_tensors
        layer = ctx.layer()
        if layer is not None and layer._step_kl is not None and layer._step_kl[1] is ctx.token:
            layer._step_kl = None  # this step is over: a later weighted_kl computes the KL afresh
        sparse = None if x_t is None else (x_t, (start, col_index))
        grad_x, grad_w, grad_s, grad_b = _lrt_grads(ctx.needs_input_grad, grad, x, x2, mean_weight, sigma2, std,
                                                    noise, sparse)
        if grad_w is not None or grad_s is not None:  # a 0-d CPU gradient is read without a device sync
            kl_scale = grad_kl.item() if grad_kl is not None and dkl is not None else 0.0
            vd_step_grads(grad_w, grad_s, weight, sigma2, dkl if kl_scale != 0 else None, keep, kl_scale)
        return grad_x, grad_w, grad_s, grad_b, None, None


class VariationalLayer(nn.Module):
    """Shared parts of LinearSVD and Conv2dSVD: parameters, log alpha, KL, mask, two forward modes."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, threshold: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(weight_shape))
        self.log_sigma2 = nn.Parameter(torch.full(weight_shape, LOG_SIGMA2_INIT))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None
        self.threshold = threshold
        # distill.train_clip: while training too, weights at or past the threshold are zero in the mean and get
        # no KL gradient (the reference code's train_clip); their variance still trains, so one can come back
        self.train_clip = False
        # whether a CPU training forward also computes the layer's KL for the loss (_LinearVDStep); off where the
        # loss has no KL term (distill.vd_weight 0), which then saves a pass over the weights
        self.kl_in_forward = True
        self._step_kl: tuple | None = None  # see take_step_kl
        fan_in = weight_shape[1] * (weight_shape[2] * weight_shape[3] if len(weight_shape) == 4 else 1)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear / nn.Conv2d's default init
        if self.bias is not None:
            bound = 1 / fan_in ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def log_alpha(self) -> torch.Tensor:
        # computed from the parameters every time: never a stale value cached by forward
        log_alpha = self.log_sigma2 - torch.log(self.weight * self.weight + 1e-8)
        return torch.clamp(log_alpha, -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)

    def kl(self) -> torch.Tensor:
        """sum over weights of kl_approx(log_alpha), with a fused backward (see _LayerKL)."""
        return _LayerKL.apply(self.weight, self.log_sigma2, 1.0, self.kl_grad_below)[0]

    @property
    def kl_grad_below(self) -> float:
        """log alpha from which the KL passes no gradient: the threshold under train_clip, else none."""
        return self.threshold if self.train_clip else math.inf

    def training_weight(self) -> torch.Tensor:
        """The mean's weight while training: the weight, or under train_clip the kept weights only."""
        if not self.train_clip:
            return self.weight
        with torch.no_grad():
            keep = self.keep_mask()
        return self.weight * keep

    def take_step_kl(self) -> torch.Tensor | None:
        """The KL output of this layer's last training forward where it has one (_LinearVDStep), once, and only
        while the parameters are the ones it was computed from; else None (compute it with `kl`)."""
        step, self._step_kl = self._step_kl, None
        if step is None or step[2] != self._parameter_state():
            return None
        return step[0]

    def _parameter_state(self) -> tuple[int, ...]:
        """What identifies the parameters' current values without reading them: the tensors themselves (one
        replaced), their memory (`.data` assigned) and version counters (changed in place; fused optimizers
        do not bump them, hence also the retirement by the step's backward)."""
        return (id(self.weight), id(self.log_sigma2), self.weight.data_ptr(), self.log_sigma2.data_ptr(),
                self.weight._version, self.log_sigma2._version)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_step_kl"] = None  # a pending step's graph is neither copied nor pickled
        return state

    def train(self, mode: bool = True):
        self._step_kl = None  # never keeps a finished step's graph alive
        return super().train(mode)

    def keep_mask(self) -> torch.Tensor:
        """True for the weights that survive at evaluation (log alpha < threshold)."""
        return self.log_alpha < self.threshold

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.keep_mask()

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._op(x, self.masked_weight(), self.bias)
        mean = self._op(x, self.training_weight(), self.bias)
        var = self._op(x * x, torch.exp(self.log_sigma2), None) + VAR_EPS
        return mean + torch.sqrt(var) * torch.randn_like(mean)


class LinearSVD(VariationalLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 3.0):
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), bias, threshold)

    def _op(self, x, weight, bias):  # x: (B, in) -> (B, out)
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._step_kl = None
        if self.training and x.device.type == "cpu" and x.dim() == 2:
            float32 = self.weight.dtype == self.log_sigma2.dtype == x.dtype == torch.float32
            on_cpu = self.weight.device.type == self.log_sigma2.device.type == "cpu"  # the kernels read pointers
            contiguous = self.weight.is_contiguous() and self.log_sigma2.is_contiguous()
            if vd_step_kernel() is not None and float32 and on_cpu and contiguous:
                token = object()
                out, kl = _LinearVDStep.apply(x, self.weight, self.log_sigma2, self.bias, self, token)
                if kl.requires_grad:
                    self._step_kl = (kl, token, self._parameter_state())
                return out
            if not self.train_clip:  # without a compiler: the PyTorch LRT
                return _LinearLRT.apply(x, self.weight, self.log_sigma2, self.bias)
            with torch.no_grad():
                keep = self.keep_mask()
                kept = self.weight * keep
            return _LinearLRT.apply(x, self.weight, self.log_sigma2, self.bias, kept, keep)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Conv2dSVD(VariationalLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0,
                 bias: bool = True, threshold: float = 3.0):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.padding = kernel_size, padding
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), bias, threshold)

    def _op(self, x, weight, bias):  # x: (B, C_in, H, W) -> (B, C_out, H', W')
        return F.conv2d(x, weight, bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}")


def variational_layers(model: nn.Module) -> list[VariationalLayer]:
    """Found by base class, never by peeking at attribute names."""
    return [m for m in model.modules() if isinstance(m, VariationalLayer)]


def total_kl(model: nn.Module) -> torch.Tensor:
    layers = variational_layers(model)
    if not layers:
        return torch.zeros(())
    return torch.stack([layer.kl() for layer in layers]).sum()


def weighted_kl(model: nn.Module, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * total KL, total KL detached): add the first to the loss as it is, report the second.

    The same gradient as scale * total_kl(model). A layer whose CPU training forward already computed its KL
    (_LinearVDStep) hands that over, once; its gradient then flows through the forward's node, so the KL and
    the data term go into one backward (as the student loss does): backpropagating them separately is a second
    backward through that node, which autograd refuses. Otherwise on the CPU kernel path the gradients come out
    of the kernel already scaled (see _LayerKL), and scale == 0 computes no gradient at all.
    """
    layers = variational_layers(model)
    if not layers:
        return torch.zeros(()), torch.zeros(())
    weighted, plain = zip(*(_layer_weighted_kl(layer, scale) for layer in layers))
    return sum(weighted[1:], weighted[0]), sum(plain[1:], plain[0])


def _layer_weighted_kl(layer: VariationalLayer, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    step_kl = layer.take_step_kl()
    if step_kl is not None:  # computed by the training forward; its gradient flows through that node's backward
        return step_kl * scale, step_kl.detach()
    return _LayerKL.apply(layer.weight, layer.log_sigma2, scale, layer.kl_grad_below)
