"""SGLD sampling from the JEM energy, with a persistent replay buffer.

x_{t+1} = x_t - step_size · ∇_x E(x_t) + noise · ε,   ε ~ N(0, I)

Chains start from the replay buffer (persistent contrastive divergence) and, with probability
`reinit_prob`, from a fresh initial sample: uniform in [-1, 1] as in JEM, or "informative"
(a per-class Gaussian fitted to the training data, as in JEM++ / SADA-JEM), which lets much
shorter chains reach realistic samples.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import JEMError
from .batch_split import map_slices, slice_count
from .models import Model

INIT_CHOICES = ("informative", "uniform")


@dataclass
class SGLDConfig:
    steps: int = 5
    step_size: float = 1.0
    noise: float = 0.01
    buffer_size: int = 10000
    reinit_prob: float = 0.05
    init: str = "informative"
    # Clamp each step's gradient to ±grad_clip and samples to ±sample_clamp (None = off).
    grad_clip: Optional[float] = None
    sample_clamp: Optional[float] = 4.0
    # Informative init: covariance is fitted at this resolution, then upsampled (keeps it small).
    init_resolution: int = 16

    def __post_init__(self) -> None:
        if self.init not in INIT_CHOICES:
            raise JEMError(f"Unknown SGLD init '{self.init}'. Choose one of: {', '.join(INIT_CHOICES)}.")
        if self.steps < 1 or self.step_size <= 0 or self.noise < 0:
            raise JEMError("SGLD needs steps ≥ 1, step size > 0 and noise ≥ 0.")
        if not 0.0 <= self.reinit_prob <= 1.0:
            raise JEMError(f"reinit_prob must lie in [0, 1] (got {self.reinit_prob}).")

    def to_dict(self) -> dict:
        return asdict(self)


class UniformInit:
    """Uniform noise in [-1, 1], the original JEM start."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def sample(self, n: int, y: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        return torch.rand(n, *self.shape, device=device) * 2 - 1


class ClassGaussianInit:
    """Per-class Gaussian N(μ_y, Σ_y) of the (normalised) training images.

    A full covariance over every pixel would be huge (12,288² for 64 px RGB), so it is fitted
    on images average-pooled to `resolution` px and the samples are upsampled bilinearly.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, resolution: int) -> None:
        _, bands, size, _ = images.shape
        self.shape = (bands, size, size)
        self.resolution = min(resolution, size)
        small = F.adaptive_avg_pool2d(images, self.resolution).flatten(1).double()
        dims = small.shape[1]
        self.class_prior = torch.bincount(labels, minlength=num_classes).double()
        overall = self._fit(small)
        fits = [self._fit(small[labels == label]) if (labels == label).sum() > 1 else overall
                for label in range(num_classes)]
        # Sampling is mean + ε Lᵀ with L the Cholesky factor: one matmul per class, no
        # torch.distributions overhead (which made a 10,000-slot buffer take ~20 s to fill).
        self.means = torch.stack([mean for mean, _ in fits])
        self.cholesky = torch.stack([chol for _, chol in fits])
        assert self.means.shape[1] == dims

    @staticmethod
    def _fit(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and Cholesky factor of the (slightly regularised) covariance."""
        mean = samples.mean(0)
        centred = samples - mean
        cov = centred.T @ centred / max(len(samples) - 1, 1)
        cov += 1e-4 * torch.eye(len(mean), dtype=cov.dtype) + 1e-2 * torch.diag(cov.diagonal())
        return mean.float(), torch.linalg.cholesky(cov).float()

    def sample(self, n: int, y: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.multinomial(self.class_prior, n, replacement=True)
        y = y.cpu()
        out = torch.empty(n, self.shape[0] * self.resolution ** 2)
        for label in y.unique().tolist():
            rows = y == label
            noise = torch.randn(int(rows.sum()), self.means.shape[1])
            out[rows] = self.means[label] + noise @ self.cholesky[label].T
        out = out.view(n, self.shape[0], self.resolution, self.resolution)
        if self.resolution != self.shape[1]:
            out = F.interpolate(out, size=self.shape[1:], mode="bilinear", align_corners=False)
        return out.to(device)


class ReplayBuffer:
    """Persistent SGLD chains kept on the compute device.

    Slot i holds a chain of class i mod num_classes, so class-conditional draws pick slots of
    the asked class and unconditional draws pick any slot.
    """

    def __init__(self, initialiser: UniformInit | ClassGaussianInit, size: int, num_classes: int,
                 device: torch.device) -> None:
        self.initialiser = initialiser
        self.device = device
        self.num_classes = num_classes
        self.per_class = max(size // num_classes, 1)
        self.labels = torch.arange(self.per_class * num_classes, device=device) % num_classes
        self.images = initialiser.sample(len(self.labels), self.labels, device)

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, n: int, y: torch.Tensor | None, reinit_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
        """n chain starts (of classes y if given) and their buffer slots."""
        if y is None:
            slots = torch.randint(0, len(self), (n,), device=self.device)
        else:
            slots = y.to(self.device) + self.num_classes * torch.randint(0, self.per_class, (n,), device=self.device)
        starts = self.images[slots]
        fresh = torch.rand(n, device=self.device) < reinit_prob
        if fresh.any():
            starts[fresh] = self.initialiser.sample(int(fresh.sum()), self.labels[slots][fresh], self.device)
        return starts, slots

    def store(self, samples: torch.Tensor, slots: torch.Tensor) -> None:
        self.images[slots] = samples.detach()

    def reset(self) -> None:
        """Restart every chain from the initial distribution (after a divergence)."""
        self.images = self.initialiser.sample(len(self.labels), self.labels, self.device)


def make_initialiser(config: SGLDConfig, images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int) -> UniformInit | ClassGaussianInit:
    """images are normalised network inputs; labels may be -1 for unlabelled images."""
    if config.init == "uniform":
        return UniformInit(tuple(images.shape[1:]))
    labelled = labels >= 0
    return ClassGaussianInit(images[labelled], labels[labelled], num_classes, config.init_resolution)


class SGLDSampler:
    def __init__(self, model: Model, config: SGLDConfig, buffer: ReplayBuffer, fused: bool = True,
                 split: bool = True) -> None:
        self.model = model
        self.config = config
        self.buffer = buffer
        self.fused = fused
        self.split = split
        # Fraction of the last batch's values pinned at ±sample_clamp (a sign of divergence), kept
        # as a device tensor so reading it is the caller's choice of when to synchronise.
        self.last_saturation = torch.zeros(())

    def sample(self, n: int, y: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """n samples from p(x) (or p(x|y)), continuing persistent chains from the buffer."""
        starts, slots = self.buffer.draw(n, y, self.config.reinit_prob)
        samples = run_chain(self.model, starts, self.config, y=y, steps=steps, fused=self.fused, split=self.split)
        self.buffer.store(samples, slots)
        if self.config.sample_clamp is not None:
            self.last_saturation = (samples.abs() >= 0.999 * self.config.sample_clamp).float().mean()
        return samples


def run_chain(model: Model, x: torch.Tensor, config: SGLDConfig, y: torch.Tensor | None = None,
              steps: int | None = None, fused: bool = True, split: bool = True) -> torch.Tensor:
    """Run SGLD from x; parameters are frozen so no weight gradients are computed.

    fused=True updates x in place (one buffer, no temporaries per step); False is the
    out-of-place form, kept as the switch docs/performance.md measures against.
    split=True runs the chains on the CPU as slices of the batch on parallel threads
    (jem_core.batch_split), each slice with its own noise generator seeded from torch's
    default one, so seeded runs repeat exactly.
    """
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    count = slice_count(len(x), x.device, split)
    generators = [None] if count == 1 else [
        torch.Generator(x.device).manual_seed(int(seed)) for seed in torch.randint(2 ** 62, (count,))]

    def chain_on(i: int, part: slice) -> torch.Tensor:
        labels = None if y is None else y[part]
        return _chain(model, x[part], config, labels, steps or config.steps, fused, generators[i])

    try:
        parts = map_slices(chain_on, len(x), count)
        return parts[0] if count == 1 else torch.cat(parts)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _chain(model: Model, x: torch.Tensor, config: SGLDConfig, y: torch.Tensor | None, steps: int, fused: bool,
           generator: torch.Generator | None) -> torch.Tensor:
    x = x.detach().clone()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            energy = model.energy(x) if y is None else model.class_energy(x, y)
            (grad,) = torch.autograd.grad(energy.sum(), x)
            x = x.detach()  # the graph is freed, so x's storage can be updated in place
            if fused:
                sgld_update_(x, grad, config, generator)
            else:
                x = sgld_update_out_of_place(x, grad, config, generator)
    return x


def sgld_update_(x: torch.Tensor, grad: torch.Tensor, config: SGLDConfig,
                 generator: torch.Generator | None = None) -> None:
    if config.grad_clip is not None:
        grad.clamp_(-config.grad_clip, config.grad_clip)
    x.add_(grad, alpha=-config.step_size)
    if config.noise > 0:
        x.add_(torch.empty_like(x).normal_(generator=generator), alpha=config.noise)
    if config.sample_clamp is not None:
        x.clamp_(-config.sample_clamp, config.sample_clamp)


def sgld_update_out_of_place(x: torch.Tensor, grad: torch.Tensor, config: SGLDConfig,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    if config.grad_clip is not None:
        grad = grad.clamp(-config.grad_clip, config.grad_clip)
    x = x - config.step_size * grad
    if config.noise > 0:
        x = x + config.noise * torch.empty_like(x).normal_(generator=generator)
    if config.sample_clamp is not None:
        x = x.clamp(-config.sample_clamp, config.sample_clamp)
    return x
