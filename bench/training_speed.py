"""JEM training-iteration speed: the original JEM loop versus ours, at equal settings.

Both sides train the same network (same weights at the start) on batches of the same size with
the same number of SGLD steps: a labelled batch of B images for the classifier, B data images and
B SGLD samples for the generative term, a replay buffer of --buffer images.

(a) reference — written the way the original JEM code (wgrathwohl/JEM, train_wrn_ebm.py) does it:
    replay buffer on the CPU, the model switched eval()/train() around every chain, a Python loop
    of autograd.grad over logsumexp f(x) with retain_graph=True, `x.data +=` updates, and three
    separate forward passes (data, samples, labelled batch) for the loss.
(b) ours — jem_core.training.training_step with the sampler and every speed switch at its default;
    with --ablation also with every switch off and one switch on at a time, so each one's effect
    is measured.

The rows take turns (one timed iteration of each per round, --repeats rounds, medians), so load
that drifts during the run hits every row alike.

Prints a table (seconds per iteration, SGLD image-steps per second, the share of the machine's
measured convolution throughput the sampler reaches), then the arithmetic bound: the iteration's
FLOPs divided by that measured peak, i.e. the fastest any implementation of the same arithmetic could
run here. Ends with `speedup: N.NN`, ours (all defaults) over the reference, per iteration.

    .venv/bin/python bench/training_speed.py --ablation  # WRN-16-2, 32 px, B=64, 20 steps, all threads
    .venv/bin/python bench/training_speed.py --device cuda --amp-row   # on a GPU
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from jem_core.models import JEM, ModelSpec, SpeedOptions, apply_speed_options, build_model, flops_per_image
from jem_core.sampler import ReplayBuffer, SGLDConfig, SGLDSampler, UniformInit
from jem_core.training import BatchStream, TrainConfig, training_step


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(calls: list[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, after one warm-up call each. The calls take turns
    (one timed call of each per round), so drifting background load hits every variant alike."""
    for fn in calls:
        fn()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for fn, sink in zip(calls, times):
            synchronise(device)
            start = time.perf_counter()
            fn()
            synchronise(device)
            sink.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def timed(fn: Callable, sink: list[float], device: torch.device) -> Callable:
    """fn, also appending its duration to sink (how the SGLD share of an iteration is measured)."""
    def wrapper(*args, **kwargs):
        synchronise(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronise(device)
        sink.append(time.perf_counter() - start)
        return out
    return wrapper


def conv_throughput(device: torch.device, seconds: float = 3.0) -> float:
    """Best FLOP/s of a 3×3, 64→64 channel float32 convolution (forward) on 64 × 32 × 32 maps, in the
    faster of the two memory layouts (NCHW and channels_last), so shares of it stay below 100 %."""
    flops = 2.0 * 64 * 64 * 32 * 32 * 64 * 9
    best = 0.0
    for layout in (torch.contiguous_format, torch.channels_last):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device, memory_format=layout)
        x = torch.randn(64, 64, 32, 32, device=device).contiguous(memory_format=layout)
        with torch.no_grad():
            conv(x)
            end = time.perf_counter() + seconds / 2
            while time.perf_counter() < end:
                start = time.perf_counter()
                conv(x)
                synchronise(device)
                best = max(best, flops / (time.perf_counter() - start))
    return best


def chain_flops(flops_per_image: float, batch: int, steps: int) -> float:
    """FLOPs of one SGLD chain: forward + input-gradient backward (≈ 2 × forward) per image-step."""
    return batch * steps * 2 * flops_per_image


def iteration_flops(flops_per_image: float, batch: int, steps: int) -> float:
    """FLOPs of one training iteration: the chain, then forward + input-gradient + weight-gradient
    (≈ 3 × forward) for the labelled, data and sample batches."""
    return chain_flops(flops_per_image, batch, steps) + 3 * batch * 3 * flops_per_image


class ReferenceJEM:
    """One training iteration as the original JEM code writes it (see the module docstring)."""

    def __init__(self, model: JEM, batch: int, steps: int, buffer_size: int, image_shape: tuple[int, ...],
                 device: torch.device, sgld: SGLDConfig, lr: float) -> None:
        self.f, self.batch, self.steps, self.device, self.sgld = model, batch, steps, device, sgld
        self.replay_buffer = torch.FloatTensor(buffer_size, *image_shape).uniform_(-1, 1)  # on the CPU
        self.optim = torch.optim.Adam(model.parameters(), lr=lr)
        self.chain_times: list[float] = []
        self.sample_q = timed(self.sample_q, self.chain_times, device)

    def sample_p_0(self) -> tuple[torch.Tensor, torch.Tensor]:
        inds = torch.randint(0, len(self.replay_buffer), (self.batch,))
        buffer_samples = self.replay_buffer[inds]
        random_samples = torch.FloatTensor(buffer_samples.shape).uniform_(-1, 1)
        choose_random = (torch.rand(self.batch) < self.sgld.reinit_prob).float()[:, None, None, None]
        samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
        return samples.to(self.device), inds

    def sample_q(self) -> torch.Tensor:
        self.f.eval()
        init_sample, buffer_inds = self.sample_p_0()
        x_k = torch.autograd.Variable(init_sample, requires_grad=True)
        for _ in range(self.steps):
            f_prime = torch.autograd.grad(self.f(x_k).logsumexp(1).sum(), [x_k], retain_graph=True)[0]
            x_k.data += self.sgld.step_size * f_prime + self.sgld.noise * torch.randn_like(x_k)
        self.f.train()
        final_samples = x_k.detach()
        self.replay_buffer[buffer_inds] = final_samples.cpu()
        return final_samples

    def iteration(self, x_lab: torch.Tensor, y_lab: torch.Tensor, x_p_d: torch.Tensor) -> None:
        x_q = self.sample_q()
        fp, fq = self.f(x_p_d).logsumexp(1).mean(), self.f(x_q).logsumexp(1).mean()
        loss = -(fp - fq) + F.cross_entropy(self.f(x_lab), y_lab)
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()


class Ours:
    """jem_core.training.training_step with the sampler, under the given speed options."""

    def __init__(self, model: JEM, options: SpeedOptions, config: TrainConfig, inputs: torch.Tensor,
                 labels: torch.Tensor, device: torch.device) -> None:
        self.model = apply_speed_options(model, options, device)
        self.config, self.inputs, self.labels = config, inputs, labels
        buffer = ReplayBuffer(UniformInit(tuple(inputs.shape[1:])), config.sgld.buffer_size, int(labels.max()) + 1,
                              device)
        self.sampler = SGLDSampler(self.model, config.sgld, buffer, fused=options.fused, split=options.split_batches)
        self.optimiser = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=options.fused)
        generator = torch.Generator().manual_seed(0)
        indices = torch.arange(len(inputs))
        self.labelled = BatchStream(indices, config.batch_size, generator)
        self.data = BatchStream(indices, config.sgld_batch_size, generator)
        self.chain_times: list[float] = []
        self.sampler.sample = timed(self.sampler.sample, self.chain_times, device)

    def iteration(self) -> None:
        training_step(self.model, self.sampler, self.optimiser, self.inputs, self.labels, self.labelled,
                      self.data, self.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="wrn-16-2")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--stem-stride", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--buffer", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed iterations per row (after one warm-up), taken in turns across the rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ablation", action="store_true", help="also time ours with the switches off one by one")
    parser.add_argument("--amp-row", action="store_true",
                        help="also time bf16 autocast (slow on CPUs without AVX512-BF16)")
    parser.add_argument("--compile-row", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    spec = ModelSpec(arch=args.arch, num_classes=10, stem_stride=args.stem_stride)
    initial = build_model(spec)
    flops = flops_per_image(initial, args.image_size)
    shape = (3, args.image_size, args.image_size)
    inputs = torch.randn(4 * args.batch, *shape, device=device)
    labels = torch.arange(len(inputs), device=device) % spec.num_classes
    sgld = SGLDConfig(steps=args.steps, buffer_size=args.buffer, init="uniform", sample_clamp=None)
    config = TrainConfig(arch=args.arch, stem_stride=args.stem_stride, image_size=args.image_size,
                         batch_size=args.batch, sgld_batch_size=args.batch, augment=False, input_noise=0.0,
                         energy_reg=0.0, lr=1e-4, sgld=sgld)

    def fresh_model() -> JEM:
        model = build_model(spec)
        model.load_state_dict(initial.state_dict())
        return model

    gflops = conv_throughput(device) / 1e9
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"net {args.arch} stem {args.stem_stride}, {args.image_size} px, {flops / 1e9:.3f} GFLOP/image forward; "
          f"batch {args.batch} labelled + {args.batch} data + {args.batch} SGLD, {args.steps} SGLD steps")
    print(f"measured conv throughput: {gflops:.1f} GFLOP/s (3x3 conv, 64 ch, 32x32, float32, best layout)\n")

    sgld_flops = chain_flops(flops, args.batch, args.steps)
    runners: list[tuple[str, Ours]] = []
    reference = ReferenceJEM(fresh_model().to(device), args.batch, args.steps, args.buffer, shape, device, sgld, 1e-4)
    x_lab, y_lab, x_p_d = inputs[:args.batch], labels[:args.batch], inputs[args.batch:2 * args.batch]

    default = SpeedOptions()
    variants = [("ours, defaults", default)]
    if args.ablation:
        off = SpeedOptions(channels_last=False, fused=False, amp="off", split_batches=False)
        variants = [("ours, all switches off", off),
                    ("ours, fused/in-place only", replace(off, fused=True)),
                    ("ours, channels_last only", replace(off, channels_last=True)),
                    ("ours, batch split only", replace(off, split_batches=True)),
                    ("ours, defaults without batch split", replace(default, split_batches=False))] + variants
    if args.amp_row:
        variants.append(("ours, defaults + bf16 autocast", replace(default, amp="bf16")))
    if args.compile_row:
        variants.append(("ours, defaults + torch.compile", replace(default, compile=True)))
    for label, options in variants:
        runners.append((label, Ours(fresh_model(), options, config, inputs, labels, device)))
    seconds = time_round_robin([lambda: reference.iteration(x_lab, y_lab, x_p_d)] +
                               [ours.iteration for _, ours in runners], args.repeats, device)
    names = ["reference (original JEM loop)"] + [label for label, _ in runners]
    chains = [reference.chain_times] + [ours.chain_times for _, ours in runners]
    rows = [(name, s, statistics.median(chain[1:])) for name, s, chain in zip(names, seconds, chains)]

    print(f"{'variant':36s} {'s/iter':>8s} {'vs ref':>7s} {'SGLD s':>7s} {'img-steps/s':>12s} {'% conv peak':>12s}")
    ref_iter = rows[0][1]
    for label, per_iter, per_chain in rows:
        rate = args.batch * args.steps / per_chain
        share = sgld_flops / per_chain / (gflops * 1e9)
        print(f"{label:36s} {per_iter:8.2f} {ref_iter / per_iter:6.2f}x {per_chain:7.2f} {rate:12.1f} {share:11.0%}")
    bound = iteration_flops(flops, args.batch, args.steps) / (gflops * 1e9)
    print(f"{'arithmetic bound (FLOPs / peak)':36s} {bound:8.2f} {ref_iter / bound:6.2f}x")
    ours_default = next(per_iter for label, per_iter, _ in rows if label == "ours, defaults")
    print(f"\nthe fastest any implementation of this iteration could run at the measured conv peak: "
          f"{ref_iter / bound:.2f}x the reference")
    print(f"speedup: {ref_iter / ours_default:.2f}")


if __name__ == "__main__":
    main()
