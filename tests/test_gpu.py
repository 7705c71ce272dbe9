"""CUDA checks (skipped without a GPU): the same code path trains and evaluates on the device."""

from __future__ import annotations

import pytest
import torch

from varstudent.nn.variational import LinearSVD

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_variational_layer_agrees_between_cpu_and_cuda() -> None:
    layer = LinearSVD(50, 20)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(20, 50) * 6)
    x = torch.randn(8, 50)
    kl_cpu, out_cpu = layer.kl(), layer.eval()(x)
    gpu = layer.cuda()
    torch.testing.assert_close(gpu.kl().cpu(), kl_cpu, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), out_cpu, rtol=1e-4, atol=1e-4)


def test_distill_stage_runs_on_cuda(tmp_path, digits_dir) -> None:
    from varstudent import stages
    from varstudent.config import load_params

    params = load_params(None, ["data.dataset=digits", "teacher.arch=mlp-200-200", "student.arch=mlp-100-50",
                                "teacher.epochs=3", "distill.epochs=3", "runtime.device=cuda",
                                "tracking.enabled=false"])
    stages.teacher(params, digits_dir, tmp_path / "teacher")
    metrics = stages.distill(params, digits_dir, tmp_path / "teacher", tmp_path / "distill")
    assert metrics["epochs_run"] == 3 and 0.0 <= metrics["student_accuracy"] <= 1.0
