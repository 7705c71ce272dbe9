"""Sparse variational dropout layers (Molchanov, Ashukha, Vetrov, ICML 2017).

Each weight has a mean theta and a log variance log sigma^2; log alpha = log sigma^2 - log theta^2 is the
per-weight dropout rate. Training uses the local reparameterization trick: sample the pre-activations,
not the weights, with mean op(x, theta) and variance op(x^2, sigma^2). At evaluation, weights whose
log alpha >= threshold are zero and the rest act as a plain dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from varstudent.nn.kernels import vdkl_kernel

# -KL(q || log-uniform prior) ~= K1 * sigmoid(K2 + K3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - K1
# (Molchanov et al. 2017, eq. 14; the fit is accurate to 1e-2 over all log alpha).
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLIP = 8.0  # log alpha is clipped to [-8, 8] as in the reference code
LOG_SIGMA2_INIT = -10.0  # starts every weight almost deterministic
VAR_EPS = 1e-8  # keeps sqrt(var) differentiable where x^2 * sigma^2 == 0


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(q(w | theta, alpha) || p(w)) per weight: >= 0, decreasing in log alpha, -> 0 as log alpha -> inf."""
    neg_kl = KL_K1 * torch.sigmoid(KL_K2 + KL_K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - KL_K1
    return -neg_kl


class _LayerKL(torch.autograd.Function):
    """sum of kl_approx(log alpha(weight, log_sigma2)) with a hand-written backward.

    Same value and gradient as autograd through `kl_approx`, much faster: the KL touches every weight on
    every step, and autograd's chain of ~25 elementwise kernels was the largest cost of a CPU distillation
    epoch. On the CPU a fused C kernel (kernels.py) does it in one pass; elsewhere, or without a compiler,
    the PyTorch code below (about half autograd's time) runs.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
        kernel = vdkl_kernel() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None
        if kernel is not None:  # one fused C pass computes the value and both gradients
            w, s = weight.detach().contiguous(), log_sigma2.detach().contiguous()
            grad_w, grad_s = torch.empty_like(w), torch.empty_like(s)
            kl = kernel(w.data_ptr(), s.data_ptr(), grad_w.data_ptr(), grad_s.data_ptr(), w.numel(), LOG_ALPHA_CLIP)
            ctx.fused = True
            ctx.save_for_backward(grad_w, grad_s)
            return torch.tensor(kl, dtype=weight.dtype)
        ctx.fused = False
        w2 = (weight * weight).add_(1e-8)
        log_alpha = torch.log(w2).neg_().add_(log_sigma2)
        unclipped = log_alpha.abs() < LOG_ALPHA_CLIP  # the clip passes no gradient
        log_alpha.clamp_(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)
        sig = torch.sigmoid(log_alpha * KL_K3 + KL_K2)
        exp_neg = torch.exp(log_alpha.neg_())  # exp(-log alpha); softplus(-a) = log1p(exp(-a))
        kl = 0.5 * torch.log1p(exp_neg).sum() - KL_K1 * sig.sum() + KL_K1 * weight.numel()
        ctx.save_for_backward(weight, w2, sig, exp_neg, unclipped)
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.fused:
            grad_w, grad_s = ctx.saved_tensors
            return grad_w * grad, grad_s * grad
        weight, w2, sig, exp_neg, unclipped = ctx.saved_tensors
        # dKL/d log alpha = -K1 K3 sig (1 - sig) - 0.5 sigmoid(-log alpha)
        d_log_alpha = (sig * (1 - sig)).mul_(-KL_K1 * KL_K3).sub_((exp_neg / (exp_neg + 1)).mul_(0.5))
        d_log_alpha.mul_(unclipped).mul_(grad)
        # log alpha = log_sigma2 - log(w^2 + eps): d/d log_sigma2 = 1, d/dw = -2w / (w^2 + eps)
        return d_log_alpha * weight * -2 / w2, d_log_alpha


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
        return _LayerKL.apply(self.weight, self.log_sigma2)

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
        mean = self._op(x, self.weight, self.bias)
        var = self._op(x * x, torch.exp(self.log_sigma2), None) + VAR_EPS
        return mean + torch.sqrt(var) * torch.randn_like(mean)


class LinearSVD(VariationalLayer):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 3.0):
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), bias, threshold)

    def _op(self, x, weight, bias):  # x: (B, in) -> (B, out)
        return F.linear(x, weight, bias)

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
