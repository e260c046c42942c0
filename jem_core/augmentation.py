"""Training-time views of normalised image batches: the weak view every step uses, the strong one
consistency training compares it with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips per image and a random quarter turn per batch: scenes seen from above have no 'up'."""
    flip_h = torch.rand(len(x), device=x.device) < 0.5
    flip_v = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(2, 3))


def strong_augment(x: torch.Tensor) -> torch.Tensor:
    """FixMatch-style strong view of normalised images: weak flips/turn, then a random shift, per-band
    contrast and brightness changes, a cut-out square and noise (the RandAugment idea without torchvision)."""
    x = augment(x)
    n, bands, size, _ = x.shape
    shift = max(size // 8, 1)
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2))
    x = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])
    contrast = torch.empty(n, 1, 1, 1, device=x.device).uniform_(0.6, 1.4)
    brightness = torch.empty(n, bands, 1, 1, device=x.device).uniform_(-0.4, 0.4)
    x = x * contrast + brightness
    cut = torch.randint(size // 4, size // 2 + 1, ())
    top, left = torch.randint(0, size - cut + 1, (2, n)).tolist()
    keep = torch.ones(n, 1, size, size, device=x.device)
    for i in range(n):
        keep[i, :, top[i]:top[i] + cut, left[i]:left[i] + cut] = 0
    return x * keep + 0.1 * torch.randn_like(x)
