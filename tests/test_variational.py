"""Sparse VD layers: the KL approximation, local reparameterization, and the evaluation mask."""

from __future__ import annotations

import shutil

import pytest
import torch

from varstudent.nn.variational import Conv2dSVD, LinearSVD, kl_approx, total_kl


def test_kl_decreases_in_log_alpha_and_vanishes() -> None:
    kl = kl_approx(torch.linspace(-8, 8, 500, dtype=torch.float64))
    assert torch.all(kl[1:] < kl[:-1])  # strictly decreasing: more noise, closer to the prior
    tail = kl_approx(torch.linspace(8, 30, 200))
    assert torch.all(tail[1:] <= tail[:-1]) and torch.all(tail >= -1e-6)
    assert kl[0] > 3.0  # log alpha = -8: an almost deterministic weight is expensive
    assert kl_approx(torch.tensor(40.0)).abs() < 1e-4  # -> 0 as log alpha -> inf


@pytest.mark.parametrize("path", ["c_kernel", "pytorch"])
def test_fused_kl_matches_autograd_value_and_gradient(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent.nn import variational
    from varstudent.nn.kernels import vdkl_kernel

    if path == "pytorch":
        monkeypatch.setattr(variational, "vdkl_kernel", lambda: None)
    elif shutil.which("cc") or shutil.which("gcc"):
        assert vdkl_kernel() is not None  # with a compiler present the kernel must build and be used
    else:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    layer = LinearSVD(300, 20)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(20, 300) * 6)  # spans both clip bounds of log alpha
    expected = kl_approx(layer.log_alpha).sum()
    grad_w, grad_s = torch.autograd.grad(expected, [layer.weight, layer.log_sigma2])
    got = layer.kl()
    assert got.grad_fn.fused is (path == "c_kernel")  # the path under test is the one that ran
    got_w, got_s = torch.autograd.grad(got, [layer.weight, layer.log_sigma2])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_s, grad_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w, grad_w, rtol=1e-4, atol=1e-4)


def test_local_reparameterization_has_the_analytic_mean_and_variance() -> None:
    layer = LinearSVD(6, 3).train()
    with torch.no_grad():
        layer.log_sigma2.fill_(-2.0)
    x = torch.randn(1, 6)
    samples = layer(x.expand(20000, 6))  # each row draws its own noise: (draws, 3)
    mean = x @ layer.weight.T + layer.bias
    var = (x * x) @ torch.exp(layer.log_sigma2).T
    torch.testing.assert_close(samples.mean(0), mean[0].detach(), atol=4 * (var[0] / 20000).sqrt().max().item(),
                               rtol=0)
    torch.testing.assert_close(samples.var(0), var[0].detach(), rtol=0.05, atol=1e-6)


def test_conv_local_reparameterization_variance() -> None:
    layer = Conv2dSVD(2, 3, 3, padding=1).train()
    with torch.no_grad():
        layer.log_sigma2.fill_(-3.0)
    x = torch.randn(1, 2, 5, 5)
    samples = layer(x.expand(4000, 2, 5, 5))  # (draws, 3, 5, 5)
    var = torch.nn.functional.conv2d(x * x, torch.exp(layer.log_sigma2), padding=1)
    torch.testing.assert_close(samples.var(0), var[0].detach(), rtol=0.12, atol=1e-5)


def test_evaluation_uses_exactly_the_kept_weights() -> None:
    torch.manual_seed(0)
    layer = LinearSVD(8, 4, threshold=1.0)  # not the default 3: the layer's own threshold must be the one used
    noise = torch.randn(4, 8) * 4
    with torch.no_grad():
        layer.weight.copy_(torch.empty(4, 8).uniform_(0.05, 0.5) * torch.randn(4, 8).sign())
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + noise)  # so log alpha ~= noise
    keep = noise < 1.0
    assert 0 < keep.sum() < keep.numel() and ((noise > 1.0) & (noise < 3.0)).any()  # both kinds, and the gap
    assert torch.equal(layer.keep_mask(), keep)
    x = torch.randn(5, 8)
    layer.eval()
    expected = x @ (layer.weight * keep).T + layer.bias
    torch.testing.assert_close(layer(x), expected.detach())
    assert torch.equal(layer(x), layer(x))  # evaluation is deterministic


def test_total_kl_sums_every_variational_layer() -> None:
    net = torch.nn.Sequential(LinearSVD(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3), LinearSVD(3, 2))
    expected = net[0].kl() + net[3].kl()
    torch.testing.assert_close(total_kl(net), expected)
