"""Training-time augmentation: random shifts of the teacher's images (`teacher.shift`) and, optionally, of the
student's (`distill.shift`, the teacher's hint then computed on the same shifted batch instead of cached)."""

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
