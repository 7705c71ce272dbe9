"""The registration gate's rules as plain functions (the MLflow side is in test_mlflow.py)."""

from __future__ import annotations

import pytest

from varstudent.config import RegisterConfig, load_params
from varstudent.gate import Scores, beats, failed_rule

CFG = RegisterConfig(max_accuracy_drop=0.01, min_compression=10.0, champion_rule="balanced", tolerance=0.002)
CHAMPION = Scores(accuracy=0.980, compression=30.0)


@pytest.mark.parametrize("candidate,rule,expected", [
    (Scores(0.979, 30.0), "balanced", True),    # within the tolerance, as compressed
    (Scores(0.977, 40.0), "balanced", False),   # more compressed but loses more than the tolerance
    (Scores(0.985, 29.0), "balanced", False),   # more accurate but less compressed
    (Scores(0.981, 31.0), "balanced", True),    # strictly better on both
    (Scores(0.983, 10.0), "accuracy", True),    # more accurate by more than the tolerance
    (Scores(0.981, 31.0), "accuracy", True),    # as accurate (within the tolerance) and more compressed
    (Scores(0.981, 30.0), "accuracy", False),   # as accurate, not more compressed
    (Scores(0.979, 31.0), "compression", True),
    (Scores(0.990, 30.0), "compression", False),  # not more compressed
    (Scores(0.970, 90.0), "compression", False),  # loses too much accuracy
])
def test_champion_rules(candidate: Scores, rule: str, expected: bool) -> None:
    assert beats(candidate, CHAMPION, rule, 0.002) is expected


def test_failed_rule_names_the_first_rule_that_fails_with_its_numbers() -> None:
    assert failed_rule(Scores(0.981, 31.0), teacher_accuracy=0.985, champion=CHAMPION, cfg=CFG) is None
    assert failed_rule(Scores(0.981, 31.0), teacher_accuracy=0.985, champion=None, cfg=CFG) is None
    drop = failed_rule(Scores(0.96, 31.0), teacher_accuracy=0.985, champion=CHAMPION, cfg=CFG)
    assert drop == "max_accuracy_drop: 2.50 points below its teacher (allowed 1.00)"
    small = failed_rule(Scores(0.981, 9.5), teacher_accuracy=0.985, champion=None, cfg=CFG)
    assert small == "min_compression: 9.5x < 10x"
    worse = failed_rule(Scores(0.975, 31.0), teacher_accuracy=0.98, champion=CHAMPION, cfg=CFG)
    assert worse.startswith("champion_rule balanced: accuracy 97.50% vs the champion's 98.00%")


# Exact boundaries, in values exact in binary floating point (0.25 / 0.5 / 0.75, steps of 2**-8) so the
# differences are exactly the tolerance. README and RegisterConfig put each boundary on the passing side:
# balanced and compression: accuracy >= champion - tolerance; accuracy rule: > champion + tolerance, or within
# (|gain| <= tolerance) and more compressed.
EDGE_CHAMPION, EDGE_TOLERANCE, STEP = Scores(accuracy=0.5, compression=30.0), 0.25, 2.0 ** -8


@pytest.mark.parametrize("candidate,rule,expected", [
    (Scores(0.25, 30.0), "balanced", True),            # exactly `tolerance` less accurate, as compressed
    (Scores(0.25 - STEP, 30.0), "balanced", False),    # just beyond it
    (Scores(0.75, 30.0), "accuracy", False),           # exactly `tolerance` more accurate is not "more than"
    (Scores(0.75 + STEP, 30.0), "accuracy", True),
    (Scores(0.75, 31.0), "accuracy", True),            # within the tolerance (its edge) and more compressed
    (Scores(0.25, 31.0), "accuracy", True),            # within the tolerance (its lower edge), more compressed
    (Scores(0.25 - STEP, 31.0), "accuracy", False),
    (Scores(0.25, 31.0), "compression", True),         # exactly `tolerance` less accurate, more compressed
    (Scores(0.25 - STEP, 31.0), "compression", False),
])
def test_champion_rules_at_the_tolerance_boundary(candidate: Scores, rule: str, expected: bool) -> None:
    assert beats(candidate, EDGE_CHAMPION, rule, EDGE_TOLERANCE) is expected


def test_gate_limits_are_inclusive() -> None:
    # README: accuracy "at most `max_accuracy_drop` below its teacher", compression "at least `min_compression`"
    cfg = RegisterConfig(max_accuracy_drop=0.25, min_compression=10.0, champion_rule="balanced", tolerance=0.0)
    assert failed_rule(Scores(0.5, 10.0), teacher_accuracy=0.75, champion=None, cfg=cfg) is None
    assert failed_rule(Scores(0.5 - STEP, 10.0), teacher_accuracy=0.75, champion=None, cfg=cfg) == \
        "max_accuracy_drop: 25.39 points below its teacher (allowed 25.00)"
    assert failed_rule(Scores(0.5, 10.0 - STEP), teacher_accuracy=0.75, champion=None, cfg=cfg) == \
        "min_compression: 10.0x < 10x"


@pytest.mark.parametrize("source", ["train", "models:/varstudent-teacher@champion", "models:/varstudent-teacher/3"])
def test_teacher_source_accepts_train_or_a_registered_model(source: str) -> None:
    assert load_params(None, [f"teacher.source={source}"]).teacher.source == source
