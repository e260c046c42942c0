"""Mapping inference without PyTorch? onnxruntime vs torch on the same model and the same patches.

    PYTHONPATH=. .venv/bin/python bench/onnx_vs_torch.py [--model jem_core/bundled/landcover_base.pt]
        [--patches 4096] [--batch 256] [--rounds 5] [--threads 1]

Exports the model as `jem map` runs it (normalisation + network → logits; −E(x) = logsumexp of the
logits is computed from them afterwards, the same for both) to ONNX with torch.onnx.export, then
times both engines in this one process, in alternating rounds (the engine that goes first swaps
every round), so machine load hits both alike.  Both are limited to --threads intra-op threads and
one inter-op thread.  Prints the median patches/s of each, their ratio, the largest logit and −E(x)
difference, and the installed size of each runtime: the files its distribution and the
distributions it requires list (numpy left out: jem_core needs it either way).

Needs onnx and onnxruntime, which are not project dependencies: install them for the measurement.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement

from jem_core.bundled import base_model_path
from jem_core.model_file import LoadedModel, load_model


class MapLogits(torch.nn.Module):
    """What mapping computes per batch: model(normalise(pixels)) → logits."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.loaded = loaded
        self.net = loaded.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(self.loaded.normalise(pixels))


def export(module: MapLogits, size: int, bands: int, path: Path) -> None:
    example = torch.rand(2, bands, size, size) * 255
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def installed_mb(distribution: str, skip: frozenset[str] = frozenset({"numpy"})) -> tuple[float, float]:
    """(MB of the distribution's own files, MB with every distribution it requires, transitively)."""
    seen: set[str] = set()
    todo = [distribution]
    sizes: dict[str, int] = {}
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen or name in skip:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        sizes[name] = sum(f.size or 0 for f in dist.files or [])
        requirements = [Requirement(r) for r in dist.requires or []]
        todo += [r.name for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    own = sizes[distribution.lower()]
    return own / 1e6, sum(sizes.values()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the bundled base model)")
    parser.add_argument("--patches", type=int, default=4096, help="patches per round (default: 4096)")
    parser.add_argument("--batch", type=int, default=256, help="patches per batch (default: 256)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both engines (default: 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    loaded = load_model(args.model or base_model_path())
    module = MapLogits(loaded).eval()
    size, bands = loaded.meta.image_size, len(loaded.meta.band_names)
    rng = np.random.default_rng(0)
    patches = rng.uniform(0, 255, (args.patches, bands, size, size)).astype(np.float32)
    batches = [patches[i:i + args.batch] for i in range(0, args.patches, args.batch)]

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export(module, size, bands, onnx_path)
        session = ort_session(onnx_path, args.threads)

    @torch.inference_mode()
    def run_torch() -> np.ndarray:
        return np.concatenate([module(torch.from_numpy(b)).numpy() for b in batches])

    def run_ort() -> np.ndarray:
        return np.concatenate([session.run(None, {"pixels": b})[0] for b in batches])

    engines = {"torch": run_torch, "onnxruntime": run_ort}
    outputs = {name: run() for name, run in engines.items()}  # warm-up, and the outputs compared
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(engines)[::-1]
        for name in order:
            start = time.perf_counter()
            engines[name]()
            seconds[name].append(time.perf_counter() - start)

    logits_diff = float(np.abs(outputs["torch"] - outputs["onnxruntime"]).max())
    neg_energy = {name: np.logaddexp.reduce(out.astype(np.float64), axis=1) for name, out in outputs.items()}
    energy_diff = float(np.abs(neg_energy["torch"] - neg_energy["onnxruntime"]).max())
    import onnxruntime

    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    print(f"{args.patches} patches of {bands} × {size} × {size} px, batch {args.batch}, {args.rounds} alternating "
          f"rounds, {args.threads} intra-op thread(s); model {args.model or base_model_path().name}")
    print(f"{'engine':12s} {'version':>12s} {'median s':>9s} {'patches/s':>10s} {'rounds (s)':>30s} "
          f"{'own MB':>7s} {'with deps MB':>13s}")
    rates = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        rates[name] = args.patches / median
        own, total = installed_mb(name)
        print(f"{name:12s} {versions[name]:>12s} {median:9.3f} {rates[name]:10.0f} "
              f"{' '.join(f'{t:.2f}' for t in times):>30s} {own:7.0f} {total:13.0f}")
    print(f"onnxruntime / torch throughput: {rates['onnxruntime'] / rates['torch']:.2f}x")
    print(f"largest difference: logits {logits_diff:.2e}, -E(x) {energy_diff:.2e}")


if __name__ == "__main__":
    main()
