"""Training-time augmentation: random shifts of the teacher's images (`teacher.shift`) and, optionally, of the
student's (`distill.shift`), and mixup of the student's (`distill.mixup`); with either, the teacher's hint is
computed on the same augmented batch instead of cached."""

from __future__ import annotations

import torch
from torch.nn import functional


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each image of x (B, C, H, W) moved by its own random whole-pixel offset (dy, dx), each in
    [-max_shift, max_shift], with zeros shifted in: Hinton et al.'s jittered MNIST inputs, and for CIFAR-10 the
    usual pad-and-crop. One gather on the device, no host sync, drawn from the default generator of x's device
    (so a CUDA graph can record it and a checkpoint's RNG state replays it)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    offsets = torch.randint(-max_shift, max_shift + 1, (2, b, 1), device=x.device)
    rows = torch.arange(h, device=x.device) + (max_shift - offsets[0])  # (B, H) rows of the padded image
    cols = torch.arange(w, device=x.device) + (max_shift - offsets[1])  # (B, W)
    padded = functional.pad(x, (max_shift,) * 4).permute(0, 2, 3, 1)  # (B, H + 2s, W + 2s, C)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def mixup(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image of x (B, ...) blended with another of the batch (Zhang et al. 2018, one weight per image):
    (lam * x + (1 - lam) * x[partner], partner, lam), lam ~ Beta(alpha, alpha) of shape (B,). Drawn on x's device
    from its default generator, as random_shift."""
    b = x.shape[0]
    partner = torch.randperm(b, device=x.device)
    concentration = torch.full((b,), float(alpha), device=x.device, dtype=x.dtype)
    lam = torch.distributions.Beta(concentration, concentration).sample()
    weight = lam.view(b, *([1] * (x.dim() - 1)))
    return x * weight + x[partner] * (1 - weight), partner, lam


def mixed_targets(targets: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels blended as mixup blended their images: class probabilities (B, num_classes), which
    F.cross_entropy takes in place of class indices."""
    one_hot = functional.one_hot(targets, num_classes).to(lam.dtype)
    return one_hot * lam[:, None] + one_hot[partner] * (1 - lam[:, None])
