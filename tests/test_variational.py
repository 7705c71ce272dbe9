"""Sparse VD layers: the KL approximation, local reparameterization, and the evaluation mask."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch

from varstudent.nn.variational import (
    LOG_ALPHA_CLIP,
    Conv2dSVD,
    LinearSVD,
    VariationalLayer,
    kl_approx,
    total_kl,
    weighted_kl,
)


def test_kl_decreases_in_log_alpha_and_vanishes() -> None:
    kl = kl_approx(torch.linspace(-8, 8, 500, dtype=torch.float64))
    assert torch.all(kl[1:] < kl[:-1])  # strictly decreasing: more noise, closer to the prior
    tail = kl_approx(torch.linspace(8, 30, 200))
    assert torch.all(tail[1:] <= tail[:-1]) and torch.all(tail >= -1e-6)
    assert kl[0] > 3.0  # log alpha = -8: an almost deterministic weight is expensive
    assert kl_approx(torch.tensor(40.0)).abs() < 1e-4  # -> 0 as log alpha -> inf


def _exact_kl(log_alpha: float) -> float:
    """KL(N(θ, αθ²) ‖ log-uniform) by quadrature: -0.5·log α + E log|ε|, ε ~ N(1, α), plus the constant
    (γ + ln 2)/2 that makes it vanish as α -> ∞ (E log|ε| -> 0.5·log α + E log|z| = 0.5·log α - (γ + ln 2)/2)."""
    from scipy import integrate

    scale = math.exp(log_alpha / 2)
    def density_log(z: float) -> float:
        return math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * math.log(abs(1 + scale * z))
    pole = -1 / scale  # log|ε| is singular at ε = 0: integrate on either side of it
    expected_log = integrate.quad(density_log, -math.inf, pole, limit=200)[0] + \
        integrate.quad(density_log, pole, math.inf, limit=200)[0]
    return -0.5 * log_alpha + expected_log + (0.5772156649015329 + math.log(2)) / 2


@pytest.mark.parametrize("log_alpha", [-8.0, -4.0, -2.0, 0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
def test_kl_approximation_is_within_a_hundredth_of_the_exact_kl(log_alpha: float) -> None:
    # the values themselves, not only the shape: Molchanov et al.'s fit is within ~0.01 over [-8, 8]
    # (0.0085 at log α = -4 is the largest gap on this grid)
    approx = kl_approx(torch.tensor(log_alpha, dtype=torch.float64)).item()
    assert approx == pytest.approx(_exact_kl(log_alpha), abs=0.01)


@pytest.mark.parametrize("shape", [(20, 300), (400, 500)])  # one chunk of the kernel; several, on threads
@pytest.mark.parametrize("path", ["c_kernel", "pytorch"])
def test_fused_kl_matches_autograd_value_and_gradient(path: str, shape: tuple[int, int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent.nn import variational
    from varstudent.nn.kernels import vdkl_kernel

    if path == "pytorch":
        monkeypatch.setattr(variational, "vdkl_kernel", lambda: None)
    elif shutil.which("cc") or shutil.which("gcc"):
        assert vdkl_kernel() is not None  # with a compiler present the kernel must build and be used
    else:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    torch.manual_seed(0)
    layer = LinearSVD(shape[1], shape[0])
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(shape) * 6)  # spans both clip bounds of log alpha
    # the reference: autograd through kl_approx in float64
    weight, log_sigma2 = (p.detach().double().requires_grad_() for p in (layer.weight, layer.log_sigma2))
    log_alpha = (log_sigma2 - torch.log(weight * weight + 1e-8)).clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)
    expected = kl_approx(log_alpha).sum()
    grad_w, grad_s = torch.autograd.grad(expected, [weight, log_sigma2])
    got = layer.kl()
    assert got.grad_fn.fused is (path == "c_kernel")  # the path under test is the one that ran
    got_w, got_s = torch.autograd.grad(got, [layer.weight, layer.log_sigma2])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_s.double(), grad_s, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_w.double(), grad_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["c_kernel", "pytorch"])
def test_weighted_kl_is_the_scaled_kl_with_the_scaled_gradient(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent.nn import variational

    if path == "pytorch":
        monkeypatch.setattr(variational, "vdkl_kernel", lambda: None)
    elif shutil.which("cc") or shutil.which("gcc"):
        assert variational.vdkl_kernel() is not None
    else:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    net = torch.nn.Sequential(LinearSVD(300, 400), torch.nn.ReLU(), LinearSVD(400, 3))  # 120k: several chunks
    params = [p for p in net.parameters() if p.dim() == 2]
    reference = total_kl(net)
    ref_grads = torch.autograd.grad(reference, params)
    for scale, upstream in [(0.25, 1.0), (0.25, 3.0)]:  # 1.0: the kernel's gradients as they are; 3.0: scaled
        weighted, plain = weighted_kl(net, scale)
        torch.testing.assert_close(plain, reference.detach())
        assert not plain.requires_grad  # the report copy carries no gradient
        torch.testing.assert_close(weighted, scale * reference.detach())
        grads = torch.autograd.grad(upstream * weighted, params)
        for got, ref in zip(grads, ref_grads):
            torch.testing.assert_close(got, upstream * scale * ref)
    weighted, plain = weighted_kl(net, 0.0)  # weighted 0 (first warm-up epoch): the value, and no gradient
    torch.testing.assert_close(plain, reference.detach())
    assert weighted.item() == 0.0 and weighted.grad_fn is not None
    assert all(g is None for g in torch.autograd.grad(weighted, params, allow_unused=True))


def test_loading_the_kernels_leaves_subnormal_floats_alone() -> None:
    # gcc < 13 links a -ffast-math shared object with crtfastmath.o, which turns on flush-to-zero for the whole
    # process when the library loads; the kernels are compiled with -ffast-math but linked without it
    import subprocess
    import sys

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: no kernel to load")
    code = ("import torch; torch.set_flush_denormal(False); from varstudent.nn import kernels; "
            "assert kernels.vdkl_kernel() and kernels.bsr_linf_kernel(); print((torch.tensor([1e-39]) * 1).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) > 0.0  # 1e-39 is subnormal in float32: flushed, it would print 0.0


def _at_thread_counts(run, counts: tuple[int, ...] = (1, 2, 3)) -> list:
    """run() once at each torch thread count, the count restored afterwards: their results in order."""
    before, results = torch.get_num_threads(), []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    return results


def test_kernel_kl_does_not_depend_on_the_thread_count() -> None:
    from varstudent.nn.kernels import vd_step_kernel, vdkl_kernel

    if vdkl_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    layer = LinearSVD(500, 400)  # 200,000 weights: 4 chunks, split across threads where OpenMP is built in
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(400, 500) * 6)

    def kls() -> tuple[torch.Tensor, ...]:
        kl = layer.kl()
        result = (kl.detach(), *torch.autograd.grad(kl, [layer.weight, layer.log_sigma2]))
        if vd_step_kernel() is not None:  # the fused training step's KL (vd_step, vd_step_grads) too
            layer.train()(torch.zeros(2, 500))
            kl = weighted_kl(layer, 1.0)[0]
            assert kl.grad_fn.next_functions[0][0].name() == "_LinearVDStepBackward"
            result += (kl.detach(), *torch.autograd.grad(kl, [layer.weight, layer.log_sigma2]))
        return result

    results = _at_thread_counts(kls)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))  # bit for bit


@pytest.mark.parametrize("train_clip", [True, False])
def test_step_pass_skips_blocks_at_the_clip_with_the_same_results(train_clip: bool) -> None:
    """vd_step (the pass before a training forward) skips the transcendental functions for blocks of weights all
    at the upper clip of log alpha, as most of a sparse layer's are: sigma^2, the KL, its derivative and the
    train_clip mask still equal the float64 reference everywhere - in dead rows, live rows, rows that alternate
    (each segment's choice of loop flips), and weights within 1e-4 of the clip (without train_clip those below
    it have a KL gradient) - at every thread count; an all-dead layer's KL is its weights' count times one's."""
    from varstudent.nn import kernels

    if kernels.vd_step_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    torch.manual_seed(8)
    rows, cols = 300, 784  # 235,200 weights: four chunks, split across threads
    weight = torch.randn(rows, cols) * 0.05
    log_alpha = torch.empty(rows, cols).uniform_(-12, 12)  # live rows: every case
    kind = torch.arange(rows) % 6
    log_alpha[kind < 3] = torch.empty(int((kind < 3).sum()), cols).uniform_(8.001, 14)  # dead rows
    near = kind == 3  # dead but for weights at the clip within the test's margin
    log_alpha[near] = torch.empty(int(near.sum()), cols).uniform_(8.001, 14)
    log_alpha[near, ::5] = 8.0 + torch.empty(int(near.sum()), len(range(0, cols, 5))).uniform_(-1e-4, 1e-4)
    log_alpha[kind == 4, 1::2] = 9.0  # half the row at the clip: no block entirely
    log_sigma2 = torch.log(weight ** 2 + 1e-8) + log_alpha
    threshold, grad_below = (3.0, 3.0) if train_clip else (None, math.inf)

    # the reference, in float64 from the same float32 inputs
    w64, ls64 = weight.double(), log_sigma2.double()
    la = ls64 - torch.log(w64 ** 2 + 1e-8)
    clipped = la.clamp(-LOG_ALPHA_CLIP, LOG_ALPHA_CLIP).requires_grad_()
    kl = kl_approx(clipped).sum()
    passes = (la.abs() < LOG_ALPHA_CLIP) & (la < grad_below)  # the clip and train_clip pass no gradient
    dkl = torch.autograd.grad(kl, clipped)[0] * passes
    keep = clipped.detach() < 3.0
    at_clip = la >= LOG_ALPHA_CLIP
    assert 0.5 < at_clip.float().mean() < 0.9 and 0 < keep.float().mean() < 0.2
    assert (dkl[near].abs().max() > 1e-4) != train_clip  # without train_clip: weights just below the clip

    def step() -> tuple:
        return kernels.vd_step(weight, log_sigma2, LOG_ALPHA_CLIP, grad_below, threshold)

    results = _at_thread_counts(step)
    for other in results[1:]:
        assert other[0] == results[0][0]
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(results[0][1:], other[1:]))
    got_kl, sigma2, got_dkl, masked, got_keep = results[0]
    assert got_kl == pytest.approx(kl.item(), rel=1e-6)
    torch.testing.assert_close(sigma2, torch.exp(log_sigma2))
    clear = (la - LOG_ALPHA_CLIP).abs() > 1e-5  # closer, float32 rounding decides which side of the clip
    torch.testing.assert_close(got_dkl.double()[clear], dkl[clear], rtol=1e-4, atol=1e-7)
    assert torch.all(got_dkl[at_clip & clear] == 0)
    if train_clip:
        assert torch.equal(got_keep, keep) and torch.equal(masked, weight * keep)
        # a run without a KL term (KD alone) under train_clip: the mask and sigma^2 alone, by the same blocks
        no_kl = kernels.vd_step(weight, log_sigma2, LOG_ALPHA_CLIP, grad_below, threshold, with_kl=False)
        assert no_kl[0] == 0.0 and no_kl[2] is None
        assert torch.equal(no_kl[1], sigma2) and torch.equal(no_kl[4], keep) and torch.equal(no_kl[3], masked)
    else:
        assert got_keep is None and masked is None
    dead = kind < 3
    dead_kl = kernels.vd_step(weight[dead].contiguous(), log_sigma2[dead].contiguous(), LOG_ALPHA_CLIP,
                              grad_below, threshold)[0]
    one = kl_approx(torch.tensor(LOG_ALPHA_CLIP, dtype=torch.float64)).item()
    assert dead_kl == pytest.approx(one * int(dead.sum()) * cols, rel=1e-4)  # float32 logf(1 + e^-8): ~3e-5


def _kernel_path(path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Selects a LinearSVD CPU training path; returns the name of its backward node.
    fused: _LinearVDStep (the vd_step kernels) with the dense products; kept: the same, and under train_clip
    the mean's products over the kept weights whatever their share (kept_matmul / kept_grad); pytorch:
    _LinearLRT and _LayerKL in PyTorch (no compiler)."""
    from varstudent.nn import variational

    if path == "pytorch":
        monkeypatch.setattr(variational, "vd_step_kernel", lambda: None)
        monkeypatch.setattr(variational, "vdkl_kernel", lambda: None)
        return "_LinearLRTBackward"
    if variational.vd_step_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    monkeypatch.setattr(variational, "KEPT_PRODUCTS_BELOW", 1.0 if path == "kept" else 0.0)
    return "_LinearVDStepBackward"


def _assert_close_as_sums(got: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal up to float32 sums taken in another order (another BLAS, another CPU): an element near zero that
    cancels terms as large as the tensor's largest may differ by ~1e-7 of those terms per term, so the absolute
    tolerance scales with the reference's magnitude (a lost or doubled weight is off by orders more)."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6 * scale)


def _count_kept_products(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each call of the kept-weights products (kept_matmul, kept_grad) by name."""
    from varstudent.nn import variational

    calls: list[str] = []
    for name in ("kept_matmul", "kept_grad"):
        def counted(*args, _name=name, _fn=getattr(variational, name)):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(variational, name, counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize(("train_clip", "path"), [(False, "fused"), (True, "fused"), (True, "kept"),
                                                  (False, "pytorch"), (True, "pytorch")])
def test_cpu_linear_training_forward_matches_autograd(bias: bool, input_grad: bool, train_clip: bool, path: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    backward_node = _kernel_path(path, monkeypatch)
    calls = _count_kept_products(monkeypatch)
    layer = LinearSVD(30, 20, bias=bias).train()
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6, 0)  # noise large enough that its gradient path matters
        layer.weight[:, ::3] *= 1e-3  # a third of the weights far past the threshold (log alpha >= ~8)
    layer.train_clip = train_clip
    assert 0.3 < layer.keep_mask().float().mean() < 0.7
    x = torch.randn(8, 30, requires_grad=input_grad)
    weight_out = torch.randn(8, 20)  # a loss with a different weight on every output
    wanted = [t for t in (x, layer.weight, layer.log_sigma2, layer.bias) if t is not None and t.requires_grad]
    torch.manual_seed(3)
    reference = VariationalLayer.forward(layer, x)  # the generic path, autograd all through
    ref_grads = torch.autograd.grad((reference * weight_out).pow(2).sum(), wanted)
    torch.manual_seed(3)
    got = layer(x)
    assert type(got.grad_fn).__name__ == backward_node  # the hand-written backward is what ran
    grads = torch.autograd.grad((got * weight_out).pow(2).sum(), wanted)  # the fused KL output unused: no KL
    torch.testing.assert_close(got, reference)  # same noise drawn at the same point
    for a, b in zip(grads, ref_grads):
        _assert_close_as_sums(a, b)
    assert calls == (["kept_matmul", "kept_grad"] if path == "kept" else [])


@pytest.mark.parametrize("scale", [0.0, 0.3, 40.0])  # 40: the KL's gradient outweighs the data's
@pytest.mark.parametrize(("train_clip", "path"), [(False, "fused"), (True, "fused"), (True, "kept")])
def test_fused_step_gradient_is_the_data_and_kl_gradient(train_clip: bool, scale: float, path: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One training step's loss, data term + scale * KL through weighted_kl, as the student loss builds it:
    the fused node (forward's KL taken up by weighted_kl) gives autograd's gradient through the generic path
    and kl_approx, on a network with layers of one and of several kernel chunks."""
    _kernel_path(path, monkeypatch)
    calls = _count_kept_products(monkeypatch)
    torch.manual_seed(4)
    net = torch.nn.Sequential(LinearSVD(300, 400), torch.nn.ReLU(), LinearSVD(400, 3)).train()
    for layer in (net[0], net[2]):
        with torch.no_grad():  # log alpha spread over [-12, 12]: clipped, pruned and kept weights all present
            spread = torch.empty(layer.weight.shape).uniform_(-12, 12)
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2 + 1e-8) + spread)
        layer.train_clip = train_clip
    x, targets = torch.randn(16, 300), torch.randint(0, 3, (16,))
    params = list(net.parameters())

    def reference_kl(layer: VariationalLayer) -> torch.Tensor:  # autograd through kl_approx, no kernel
        log_alpha = layer.log_sigma2 - torch.log(layer.weight ** 2 + 1e-8)
        if layer.train_clip:  # a pruned weight's KL passes no gradient
            log_alpha = torch.where(log_alpha < layer.threshold, log_alpha, log_alpha.detach())
        return kl_approx(torch.clamp(log_alpha, -LOG_ALPHA_CLIP, LOG_ALPHA_CLIP)).sum()

    torch.manual_seed(5)
    out = VariationalLayer.forward(net[2], net[1](VariationalLayer.forward(net[0], x)))  # generic, autograd
    ref_kl = reference_kl(net[0]) + reference_kl(net[2])
    ref_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, targets) + scale * ref_kl, params)
    assert net[0].take_step_kl() is None  # nothing offered before a forward
    torch.manual_seed(5)
    out = net(x)
    assert type(out.grad_fn).__name__ == "_LinearVDStepBackward"  # the path under test is the one that ran
    weighted, got_kl = weighted_kl(net, scale)
    got_grads = torch.autograd.grad(torch.nn.functional.cross_entropy(out, targets) + weighted, params)
    torch.testing.assert_close(got_kl, ref_kl.detach())
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    if train_clip:  # pruned weights: no gradient at all for their mean
        keep = net[0].keep_mask()
        assert torch.all(got_grads[0][~keep] == 0) and 0 < keep.sum() < keep.numel()
    assert calls == (["kept_matmul"] * 2 + ["kept_grad"] * 2 if path == "kept" else [])


def test_a_sparse_layer_trains_through_the_kept_weights_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under train_clip a layer keeping few weights computes the mean's products over those alone: the same
    output and gradients as the dense products, bit for bit whatever the thread count; a denser one does not."""
    from varstudent.nn import variational

    if variational.kept_products_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    calls = _count_kept_products(monkeypatch)
    torch.manual_seed(6)
    layer = LinearSVD(785, 301).train()  # 236,285 weights: several chunks; 785 columns: a ragged last word
    layer.train_clip = True
    x = torch.rand(229, 785)  # 301 x 229 outputs, over one chunk: split across threads too; no multiple of 4

    def step() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(7)
        out = layer(x)
        weighted = weighted_kl(layer, 0.5)[0]
        return (out.detach(), *torch.autograd.grad((out * out).sum() + weighted, list(layer.parameters())))

    sign = torch.where(torch.rand(layer.weight.shape) < 0.5, -1.0, 1.0)
    # |w| >= 0.01: log alpha <= -0.8; 1e-3 times that: >= 9.8
    weight = (torch.rand(layer.weight.shape) * 0.04 + 0.01) * sign

    def keep_share(share: float) -> None:  # `share` of the weights kept, the rest far past the threshold
        with torch.no_grad():
            layer.weight.copy_(weight * torch.where(torch.rand(weight.shape) < share, 1.0, 1e-3))

    for share, sparse in ((0.05, True), (0.5, False)):
        keep_share(share)
        assert abs(layer.keep_mask().float().mean() - share) < 0.01
        calls.clear()
        got = step()
        assert calls == (["kept_matmul", "kept_grad"] if sparse else [])
        monkeypatch.setattr(variational, "KEPT_PRODUCTS_BELOW", 0.0)  # the dense products, as reference
        reference = step()
        monkeypatch.undo()
        calls = _count_kept_products(monkeypatch)
        for a, b in zip(got, reference):
            _assert_close_as_sums(a, b)
    keep_share(0.08)
    results = _at_thread_counts(step)
    assert "kept_grad" in calls
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))  # bit for bit


@pytest.mark.parametrize("shape", [(0, 4), (1, 5), (7, 9), (100, 784), (229, 65)])
def test_the_c_transpose_is_the_transpose(shape: tuple[int, int]) -> None:
    from varstudent.nn.kernels import kept_products_kernel, transposed

    if kept_products_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    matrix = torch.randn(*shape)
    for result in _at_thread_counts(lambda: transposed(matrix), (1, 2)):
        assert torch.equal(result, matrix.t().contiguous())


@pytest.mark.parametrize("batch", ["one", "none", "transposed", "strided"])
@pytest.mark.parametrize("kept", [0, 3])
def test_kept_products_take_any_batch_and_a_layer_with_nothing_kept(batch: str, kept: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_path("kept", monkeypatch)
    calls = _count_kept_products(monkeypatch)
    layer = LinearSVD(21, 5).train()
    layer.train_clip = True
    with torch.no_grad():
        layer.weight.fill_(1e-6)  # log alpha 17.6: all pruned
        layer.weight[:, :kept] = 0.5
    source = torch.randn(42, 21)
    x = {"one": source[:1], "none": source[:0], "transposed": torch.randn(21, 6).t(), "strided": source[::7]}[batch]
    x.requires_grad_(True)
    params = [x, layer.weight, layer.log_sigma2, layer.bias]

    def step() -> tuple[torch.Tensor, ...]:
        torch.manual_seed(8)
        out = layer(x)
        return (out.detach(), *torch.autograd.grad((out * torch.arange(5.0)).sum(), params))

    got = step()
    assert calls == ["kept_matmul", "kept_grad"]
    _kernel_path("fused", monkeypatch)
    reference = step()
    assert len(calls) == 2  # the reference took the dense products
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b)
    assert torch.all(got[2][:, kept:] == 0)  # no gradient for a pruned weight's mean


def test_a_cpu_batch_into_a_layer_elsewhere_is_a_torch_error_not_a_crash() -> None:
    layer = LinearSVD(20, 10).to("meta").train()  # stands for a CUDA model given a CPU batch: no C kernel call
    with pytest.raises(RuntimeError):
        layer(torch.randn(4, 20))


def test_the_forward_kl_is_offered_once_and_only_while_current(monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_path("fused", monkeypatch)
    layer = LinearSVD(20, 10).train()
    x = torch.randn(4, 20)
    layer(x)
    offered = layer.take_step_kl()
    torch.testing.assert_close(offered.detach(), layer.kl().detach())  # the layer's KL, as computed afresh
    assert layer.take_step_kl() is None  # once: a second loss from one forward computes it again

    def check_gone(event) -> None:
        layer(x)
        event()
        assert layer.take_step_kl() is None

    def update() -> None:  # an optimizer-like in-place change of the parameters since the forward
        with torch.no_grad():
            layer.log_sigma2.add_(1)

    check_gone(update)
    check_gone(lambda: setattr(layer, "log_sigma2", torch.nn.Parameter(layer.log_sigma2.detach() - 1)))  # replaced
    check_gone(lambda: setattr(layer.weight, "data", layer.weight.detach() * 2))  # .data: no version bump
    check_gone(lambda: layer(x).sum().backward())  # a newer forward, whose step then ended in a backward
    check_gone(lambda: layer.eval())  # a mode switch drops the step's graph
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.take_step_kl() is None  # a forward without gradients offers nothing to a loss
    layer(x)
    copied = copy.deepcopy(layer)  # a pending step neither blocks a copy nor travels with it
    assert copied.take_step_kl() is None and layer.take_step_kl() is not None
    layer.kl_in_forward = False  # a loss with no KL term: the forward does not compute it
    out = layer(x)
    assert layer.take_step_kl() is None and type(out.grad_fn).__name__ == "_LinearVDStepBackward"
    weighted, plain = weighted_kl(layer, 1.0)  # still correct when asked: computed afresh
    torch.testing.assert_close(plain, layer.kl().detach())


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


def test_a_second_backward_through_the_fused_kl_says_why() -> None:
    from varstudent.nn.kernels import vdkl_kernel

    if vdkl_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    kl = LinearSVD(10, 5).kl()
    kl.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*VARSTUDENT_NO_KERNELS"):
        kl.backward()


def _half_pruned(layer: VariationalLayer) -> torch.Tensor:
    """Sets log alpha to -6 or +6 on a random half of the weights each; returns the keep mask."""
    torch.manual_seed(1)
    keep = torch.rand(layer.weight.shape) < 0.5
    with torch.no_grad():
        layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(0.1, 0.5) * torch.randn(layer.weight.shape).sign())
        layer.log_sigma2.copy_(torch.log(layer.weight ** 2) + torch.where(keep, -6.0, 6.0))
    assert torch.equal(layer.keep_mask(), keep)
    return keep


@pytest.mark.parametrize("make", [lambda: LinearSVD(12, 7), lambda: Conv2dSVD(3, 4, 3, padding=1)],
                         ids=["linear", "conv"])
def test_train_clip_drops_pruned_weights_from_the_training_mean(make) -> None:
    layer = make().train()
    keep = _half_pruned(layer)
    x = torch.randn(16, 12) if isinstance(layer, LinearSVD) else torch.randn(16, 3, 6, 6)
    std = (layer._op(x * x, torch.exp(layer.log_sigma2), None) + 1e-8).sqrt().detach()
    full, kept = (layer._op(x, w, layer.bias).detach() for w in (layer.weight, layer.weight * keep))
    assert (full - kept).abs().max() > 0.1  # the pruned weights matter to the output

    def drawn(out: torch.Tensor) -> torch.Tensor:  # the noise the layer drew: both paths draw it last
        torch.manual_seed(7)
        return torch.randn(out.shape)

    torch.manual_seed(7)
    out = layer(x)
    torch.testing.assert_close(out, full + std * drawn(out), atol=1e-4, rtol=1e-4)  # off: every weight's mean
    layer.train_clip = True
    torch.manual_seed(7)
    out = layer(x)
    torch.testing.assert_close(out, kept + std * drawn(out), atol=1e-4, rtol=1e-4)  # on: the kept ones only
    grad_w, grad_s = torch.autograd.grad(out.sum(), [layer.weight, layer.log_sigma2])
    assert torch.all(grad_w[~keep] == 0) and torch.any(grad_w[keep] != 0)  # no mean gradient for pruned ones
    assert torch.any(grad_s[~keep] != 0)  # their variance still trains: a pruned weight can come back


@pytest.mark.parametrize("path", ["c_kernel", "pytorch"])
def test_train_clip_stops_the_kl_gradient_of_pruned_weights(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from varstudent.nn import variational

    if path == "pytorch":
        monkeypatch.setattr(variational, "vdkl_kernel", lambda: None)
    elif variational.vdkl_kernel() is None:
        pytest.skip("no C compiler: the kernel path cannot be built here")
    net = torch.nn.Sequential(LinearSVD(300, 400), torch.nn.ReLU(), LinearSVD(400, 3))  # several kernel chunks
    torch.manual_seed(2)
    for layer in (net[0], net[2]):
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.log(layer.weight ** 2 + 1e-8) + torch.randn(layer.weight.shape) * 4)
    params = [p for p in net.parameters() if p.dim() == 2]
    plain_value, _ = weighted_kl(net, 0.5)
    plain = torch.autograd.grad(plain_value, params)
    for layer in (net[0], net[2]):
        layer.train_clip = True
    clipped_value, report = weighted_kl(net, 0.5)
    clipped = torch.autograd.grad(clipped_value, params)
    torch.testing.assert_close(clipped_value.detach(), plain_value.detach())  # the value still counts them all
    masks = [layer.keep_mask() for layer in (net[0], net[2]) for _ in range(2)]  # weight, log_sigma2 per layer
    for got, ref, keep in zip(clipped, plain, masks):
        assert 0 < keep.sum() < keep.numel()
        assert torch.all(got[~keep] == 0) and torch.any(ref[~keep] != 0)
        torch.testing.assert_close(got[keep], ref[keep])
