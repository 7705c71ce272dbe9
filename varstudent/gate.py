"""The registration gate, as plain functions (no MLflow): may a compact student become the champion?

A candidate must (1) lose at most `max_accuracy_drop` accuracy against its teacher, (2) be compressed at
least `min_compression` times, and (3) beat the current champion, both measured on the candidate's test set,
by `champion_rule` (see RegisterConfig). The first rule that fails is the reason it stays a challenger.
"""

from __future__ import annotations

from dataclasses import dataclass

from varstudent.config import RegisterConfig


@dataclass(frozen=True)
class Scores:
    accuracy: float      # on the candidate's test set
    compression: float   # teacher weights / nonzero weights of the compact student


def beats(candidate: Scores, champion: Scores, rule: str, tolerance: float) -> bool:
    acc_gain = candidate.accuracy - champion.accuracy
    more_compressed = candidate.compression > champion.compression
    if rule == "balanced":
        return (acc_gain >= -tolerance and candidate.compression >= champion.compression) or \
            (acc_gain > 0 and more_compressed)
    if rule == "accuracy":
        return acc_gain > tolerance or (abs(acc_gain) <= tolerance and more_compressed)
    if rule == "compression":
        return more_compressed and acc_gain >= -tolerance
    raise ValueError(f"unknown champion rule {rule!r}")


def failed_rule(candidate: Scores, teacher_accuracy: float, champion: Scores | None,
                cfg: RegisterConfig) -> str | None:
    """None when the candidate may take `champion`; else which rule failed, with the numbers."""
    drop = teacher_accuracy - candidate.accuracy
    if drop > cfg.max_accuracy_drop:
        return (f"max_accuracy_drop: {100 * drop:.2f} points below its teacher "
                f"(allowed {100 * cfg.max_accuracy_drop:.2f})")
    if candidate.compression < cfg.min_compression:
        return f"min_compression: {candidate.compression:.1f}x < {cfg.min_compression:g}x"
    if champion is not None and not beats(candidate, champion, cfg.champion_rule, cfg.tolerance):
        return (f"champion_rule {cfg.champion_rule}: accuracy {100 * candidate.accuracy:.2f}% vs the champion's "
                f"{100 * champion.accuracy:.2f}% (tolerance {100 * cfg.tolerance:.2f} points), compression "
                f"{candidate.compression:.1f}x vs {champion.compression:.1f}x")
    return None
