"""The evaluate stage's speed measurement: every model timed as often as asked, in interleaved rounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from varstudent.evaluate import BATCHES, SPEED_ROUNDS, measure_speeds


class Recorder(nn.Module):
    def __init__(self, name: str, calls: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.name, x.shape[0]))
        return x.flatten(1)[:, :3]


def test_models_are_timed_in_interleaved_rounds() -> None:
    calls: list[tuple[str, int]] = []
    models = [Recorder("teacher", calls), Recorder("compact", calls)]
    threads = torch.get_num_threads()
    speeds = measure_speeds(models, torch.rand(7, 1, 4, 4), repeats=12, warmup=2, threads=1)
    assert torch.get_num_threads() == threads  # restored
    warm, timed = calls[:2 * 2 * len(BATCHES)], calls[2 * 2 * len(BATCHES):]
    assert sorted(set(warm)) == sorted({(m, b) for m in ("teacher", "compact") for b in BATCHES})
    assert all(warm.count((m, b)) == 2 for m in ("teacher", "compact") for b in BATCHES)  # warmup=2 each
    for name in ("teacher", "compact"):
        for batch in BATCHES:  # batches built from the 7-sample test slice, repeated as needed
            assert timed.count((name, batch)) == 12
    switches = sum(a[0] != b[0] for a, b in zip(timed, timed[1:]))
    assert switches == 2 * SPEED_ROUNDS - 1  # teacher, compact, teacher, ... once per round each
    for model_speed in speeds:
        assert set(model_speed) == set(BATCHES)
        for batch, s in model_speed.items():
            assert 0 < s["latency_ms_median"] <= s["latency_ms_p95"]
            assert s["samples_per_s"] == pytest.approx(batch * 1e3 / s["latency_ms_median"])  # per sample, not call
            assert s["threads"] == 1


def test_fewer_repeats_than_rounds_still_time_each_model_once_a_round() -> None:
    calls: list[tuple[str, int]] = []
    measure_speeds([Recorder("only", calls)], torch.rand(3, 1, 2, 2), repeats=2, warmup=0)
    assert calls == [("only", 1), ("only", 256)] * 2


def test_a_model_with_its_own_thread_pool_is_timed_alone_after_the_others() -> None:
    calls: list[tuple[str, int]] = []
    onnx_like = Recorder("onnx", calls)
    onnx_like.threads = 2  # what load_onnx sets: onnxruntime's own pool, whose spinning slowed the next model
    speeds = measure_speeds([Recorder("teacher", calls), onnx_like, Recorder("compact", calls)],
                            torch.rand(5, 1, 4, 4), repeats=10, warmup=1)
    first_onnx = calls.index(("onnx", 1))
    assert all(name != "onnx" for name, _ in calls[:first_onnx])
    assert all(name == "onnx" for name, _ in calls[first_onnx:])  # nothing of the PyTorch models after it
    assert sum(name == "onnx" for name, _ in calls) == (10 + 1) * len(BATCHES)
    assert speeds[1][256]["threads"] == 2 and speeds[0][256]["threads"] == torch.get_num_threads()
