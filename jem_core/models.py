"""Wide-ResNet without batch norm, as in JEM, wrapped as a joint energy-based model.

The same network is a classifier p(y|x) = softmax(f(x)) and an energy model
p(x) ∝ exp(-E(x)) with E(x) = -logsumexp_y f(x)[y].  Batch norm is left out because it
makes E(x) depend on the rest of the batch, which breaks SGLD sampling.

A JEMEnsemble holds several such networks trained apart (`jem retrain` makes two when fine-tuning) and is
used wherever a JEM is: its p(y|x) and E(x) are the members' means.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import JEMError

# name -> (depth, widen factor).  Depth = 6 n + 4 with n residual blocks per group.
ARCHITECTURES: dict[str, tuple[int, int]] = {
    "wrn-10-1": (10, 1),
    "wrn-10-2": (10, 2),
    "wrn-16-2": (16, 2),
    "wrn-16-4": (16, 4),
    "wrn-16-8": (16, 8),
    "wrn-28-2": (28, 2),
    "wrn-28-10": (28, 10),
}
NORMS = ("none", "layer", "group", "instance")
AMP_CHOICES = ("auto", "off", "bf16")


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network; stored in the model file."""

    arch: str = "wrn-16-2"
    in_channels: int = 3
    num_classes: int = 10
    norm: str = "none"
    dropout: float = 0.0
    # A stride-2 stem halves every feature map: 64 px inputs then cost what 32 px do.
    stem_stride: int = 1
    # > 1: that many networks of this spec, trained apart and used as one model (JEMEnsemble).
    members: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise JEMError(f"Unknown architecture '{self.arch}'. Choose one of: {', '.join(ARCHITECTURES)}.")
        if self.norm not in NORMS:
            raise JEMError(f"Unknown norm '{self.norm}'. Choose one of: {', '.join(NORMS)}.")
        if self.in_channels < 1:
            raise JEMError(f"A model needs at least one input band (got {self.in_channels}).")
        if self.num_classes < 2:
            raise JEMError(f"A classifier needs at least two classes (got {self.num_classes}).")
        if self.stem_stride not in (1, 2):
            raise JEMError(f"stem_stride must be 1 or 2 (got {self.stem_stride}).")
        if self.members < 1:
            raise JEMError(f"A model needs at least one member network (got {self.members}).")

    def member_spec(self) -> "ModelSpec":
        return replace(self, members=1)

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.members == 1:
            del values["members"]  # single-network files stay readable by JEM-EO versions before ensembles
        return values


@dataclass
class SpeedOptions:
    """Switches for the speed optimisations; docs/performance.md gives each one's measured effect."""

    # NHWC tensors: oneDNN's fast convolution path on CPU, tensor cores on GPU.
    channels_last: bool = True
    # bf16 autocast: "auto" = on for CUDA, off on CPU (a CPU without AVX512-BF16 runs it ~10x slower).
    amp: str = "auto"
    # torch.compile the feature extractor (needs a C++ compiler on CPU / Triton on CUDA).
    compile: bool = False
    # Fused Adam and in-place SGLD updates.
    fused: bool = True
    # CPU: run SGLD chains as slices of the batch on parallel single-threaded workers (batch_split.py).
    split_batches: bool = True

    def __post_init__(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise JEMError(f"Unknown mixed-precision mode '{self.amp}'. Choose one of: {', '.join(AMP_CHOICES)}.")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.amp == "bf16" or (self.amp == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    return nn.Identity()


class WideBasic(nn.Module):
    """Pre-activation residual block: norm → LeakyReLU → conv, twice, plus a shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm_layer(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = _norm_layer(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.leaky_relu(self.norm1(x), 0.2)))
        out = self.conv2(F.leaky_relu(self.norm2(out), 0.2))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Feature extractor; global average pooling makes it work for any input size ≥ 8 px."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        depth, widen = ARCHITECTURES[spec.arch]
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(spec.in_channels, widths[0], 3, stride=spec.stem_stride, padding=1, bias=True)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for group, stride in zip(range(1, 4), (1, 2, 2)):
            for block in range(blocks_per_group):
                layers.append(WideBasic(in_planes, widths[group], stride if block == 0 else 1, spec.norm, spec.dropout))
                in_planes = widths[group]
        self.blocks = nn.Sequential(*layers)
        self.final_norm = _norm_layer(spec.norm, in_planes)
        self.out_features = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def pool(self, block_output: torch.Tensor) -> torch.Tensor:
        """The last block's output → the pooled features the head reads."""
        return F.adaptive_avg_pool2d(F.leaky_relu(self.final_norm(block_output), 0.2), 1).flatten(1)

    def layer_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """forward(x), and the per-channel spatial mean and std of the stem's and every block's output
        (N, 2 × all their channels): the image statistics the network's filters see."""
        x = self.stem(x)
        statistics = [x.mean((2, 3)), x.std((2, 3))]
        for block in self.blocks:
            x = block(x)
            statistics += [x.mean((2, 3)), x.std((2, 3))]
        return self.pool(x), torch.cat(statistics, 1)


class EnergyModel(nn.Module):
    """What every model offers on top of its logits f(x): the energies of p(x) and p(x, y)."""

    @staticmethod
    def energy_from_logits(logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits, dim=1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """E(x) = -log Σ_y exp f(x)[y]; lower energy = more typical of the training data."""
        return self.energy_from_logits(self(x))

    def class_energy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """E(x, y) = -f(x)[y], the energy of the joint p(x, y)."""
        return -self(x).gather(1, y[:, None]).squeeze(1)


class JEM(EnergyModel):
    """Wide-ResNet + linear head: logits f(x), energy E(x) = -logsumexp f(x)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.features = WideResNet(spec)
        self.head = nn.Linear(self.features.out_features, spec.num_classes)
        # Set by apply_speed_options (load_model applies channels_last); a built model runs float32 NCHW.
        self.channels_last = False
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_features(x)[0]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x) and the pooled features the head reads them from, in one pass (both float32)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            features = self.features(x)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                features = self.features(x).float()  # logits, energies and losses stay float32
        return self.head(features), features

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads."""
        return self.features(x)

    def familiarity_and_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """−E(x) (N,) and the layer statistics of WideResNet.layer_statistics (N, D)."""
        pooled, statistics = self.features.layer_statistics(x)
        return torch.logsumexp(self.head(pooled), 1), statistics


class JEMEnsemble(EnergyModel):
    """Member JEMs trained apart, used as one: p(y|x) is the members' mean p(y|x) and E(x) their mean energy.

    Its logits g(x) = log mean_m softmax f_m(x) + mean_m logsumexp f_m(x) carry both: softmax g is the
    mean p(y|x) (the shift cancels), logsumexp g is the mean −E(x) (the log-probabilities sum to log 1).
    """

    def __init__(self, spec: ModelSpec, members: list[JEM] | None = None) -> None:
        """members: trained networks of spec.member_spec() (None: spec.members new ones)."""
        super().__init__()
        self.spec = spec
        self.members = nn.ModuleList(members if members is not None else
                                     [JEM(spec.member_spec()) for _ in range(spec.members)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combined_logits(torch.stack([member(x) for member in self.members]))

    @staticmethod
    def combined_logits(logits: torch.Tensor) -> torch.Tensor:
        """The ensemble's g(x) from its members' logits (members, N, classes)."""
        mean_probabilities = torch.logsumexp(F.log_softmax(logits, 2), 0) - math.log(len(logits))
        return mean_probabilities + torch.logsumexp(logits, 2).mean(0)[:, None]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(x) and the members' pooled features side by side (N, members × features), in one pass."""
        logits, features = zip(*(member.logits_and_features(x) for member in self.members))
        return self.combined_logits(torch.stack(logits)), torch.cat(features, 1)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([member.penultimate(x) for member in self.members], 1)

    def familiarity_and_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        familiarity, statistics = zip(*(member.familiarity_and_statistics(x) for member in self.members))
        return torch.stack(familiarity).mean(0), torch.cat(statistics, 1)


Model = JEM | JEMEnsemble


def build_model(spec: ModelSpec) -> Model:
    return JEMEnsemble(spec) if spec.members > 1 else JEM(spec)


def networks(model: Model) -> list[JEM]:
    """The single networks of a model: its members, or the model itself."""
    return list(model.members) if isinstance(model, JEMEnsemble) else [model]


def feature_count(model: Model) -> int:
    """Length of the pooled features logits_and_features gives (an ensemble's members' side by side)."""
    return sum(network.features.out_features for network in networks(model))


def ensemble_of(members: list[JEM]) -> Model:
    """One model of trained networks of the same spec (a single network stays itself)."""
    if len(members) == 1:
        return members[0]
    return JEMEnsemble(replace(members[0].spec, members=len(members)), members)


def apply_speed_options(model: Model, options: SpeedOptions, device: torch.device) -> Model:
    """Move the model to device with the chosen memory format, precision and compilation."""
    model.to(device)
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    for network in networks(model):
        network.channels_last = options.channels_last
        network.autocast_dtype = options.autocast_dtype(device)
        if options.compile:
            network.features.compile(dynamic=False)  # in place: state_dict keys stay the same
    return model


def flops_per_image(model: Model, image_size: int) -> float:
    """Multiply-adds ×2 of one forward pass, counted from the conv and linear layers."""
    total = 0.0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2.0 * output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += 2.0 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.zeros(1, model.spec.in_channels, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total
