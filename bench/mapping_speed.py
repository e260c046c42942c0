"""Mapping throughput and peak memory, small vs very large raster, next to the FLOP-bound limit.

    .venv/bin/python bench/mapping_speed.py [--large 20000] [--small 2048]

The rasters are VRT mosaics of one 1024 × 1024 tiled GeoTIFF tile (written to a temp folder), so a
20,000 × 20,000 raster costs no disk.  Every configuration runs in a fresh child process that
reports its RSS after importing torch and loading the model ("before"), while the map is 10, 50 and
90 % done, and at its peak (VmHWM): flat numbers mean streaming works.  The FLOP-bound limit is
measured conv throughput ÷ jem_core.models.flops_per_image for the model's patch size.  The machine
is shared, so wall-clock rates move with other people's load; the per-CPU-second rates (process
CPU time, and conv FLOP per CPU second, best of a measurement before and after mapping) do not.  The model
is the demo's architecture (wrn-10-2, stem stride 2, 32 px, 30 classes, RGB) with random weights:
speed does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 1024
PATCH = 32


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_tile(path: Path) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (3, TILE // 16, TILE // 16))
    pixels = np.repeat(np.repeat(coarse, 16, 1), 16, 2) + rng.normal(0, 12, (3, TILE, TILE))
    with rasterio.open(path, "w", driver="GTiff", width=TILE, height=TILE, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 10, 10), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(np.clip(pixels, 0, 255).astype(np.uint8))


def write_mosaic_vrt(tile: Path, size: int, path: Path) -> None:
    """A size × size VRT repeating the tile (the last row/column of tiles clipped)."""
    bands = []
    for band in range(1, 4):
        sources = []
        for row in range(0, size, TILE):
            for col in range(0, size, TILE):
                w, h = min(TILE, size - col), min(TILE, size - row)
                sources.append(f'<SimpleSource><SourceFilename relativeToVRT="0">{tile}</SourceFilename>'
                               f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                               f'<DstRect xOff="{col}" yOff="{row}" xSize="{w}" ySize="{h}"/></SimpleSource>')
        interp = ("Red", "Green", "Blue")[band - 1]
        bands.append(f'<VRTRasterBand dataType="Byte" band="{band}"><ColorInterp>{interp}</ColorInterp>'
                     + "".join(sources) + "</VRTRasterBand>")
    path.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:32633</SRS>'
                    f'<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>{"".join(bands)}</VRTDataset>')


def demo_model(channels_last: bool = True):
    import torch

    from jem_core.model_file import LoadedModel, ModelMeta, ready_for_inference
    from jem_core.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="wrn-10-2", in_channels=3, num_classes=30, stem_stride=2)).eval()
    if channels_last:  # as load_model prepares every model file
        ready_for_inference(model, "cpu")
    meta = ModelMeta(class_names=[f"class {i}" for i in range(30)], band_names=["red", "green", "blue"],
                     image_size=PATCH, mean=[100.0] * 3, std=[50.0] * 3)
    return LoadedModel(model, meta)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def conv_throughput(threads: int, seconds: float = 2.0) -> tuple[float, float]:
    """(FLOP per wall second, FLOP per CPU second) of 3×3 convolutions shaped like the model's middle
    layers (batch 64, 32 channels, 16 px), in the faster of NCHW and channels_last.  On a shared
    machine the CPU-second figure is the stable one."""
    import torch

    torch.set_num_threads(threads)
    flops = 2.0 * 64 * 32 * 16 * 16 * 32 * 9
    best = (0.0, 0.0)
    for layout in (torch.contiguous_format, torch.channels_last):
        conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(memory_format=layout)
        x = torch.randn(64, 32, 16, 16).contiguous(memory_format=layout)
        with torch.inference_mode():
            conv(x)
            runs, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
            while time.perf_counter() - start < seconds / 2:
                conv(x)
                runs += 1
        rates = (flops * runs / (time.perf_counter() - start), flops * runs / max(cpu_seconds() - cpu_start, 1e-9))
        best = max(best, rates, key=lambda rate: rate[1])
    return best


def network_rate(loaded, batch_size: int, seconds: float = 2.0) -> float:
    """Patches per CPU second of the network alone (forward passes on a random batch)."""
    import torch

    x = torch.randn(batch_size, 3, PATCH, PATCH)
    with torch.inference_mode():
        loaded.model(x)
        runs, start = 0, cpu_seconds()
        while cpu_seconds() - start < seconds:
            loaded.model(x)
            runs += 1
    return runs * batch_size / (cpu_seconds() - start)


def child(args: argparse.Namespace) -> None:
    import torch

    from jem_core.mapping import map_raster
    from jem_core.models import flops_per_image

    torch.set_num_threads(args.threads)
    loaded = demo_model(channels_last=not args.nchw)
    before = vm_kib("VmRSS")
    conv_before = conv_throughput(args.threads)
    rss_at: dict[str, float] = {}

    def progress(fraction: float, message: str) -> None:  # RSS as the map grows: flat means streaming works
        for mark in (0.1, 0.5, 0.9):
            if fraction >= mark and f"{mark:.0%}" not in rss_at:
                rss_at[f"{mark:.0%}"] = vm_kib("VmRSS") / 1024

    cpu_start = cpu_seconds()
    with tempfile.TemporaryDirectory() as out:
        result = map_raster(loaded, args.raster, Path(out) / "c.tif", Path(out) / "e.tif", device="cpu",
                            read_ahead=args.read_ahead, batch_size=args.batch_size, progress=progress)
    cpu = cpu_seconds() - cpu_start
    conv_after = conv_throughput(args.threads)
    print(json.dumps({"patches": result.patches, "seconds": result.seconds, "cpu_seconds": cpu,
                      "pps": result.patches_per_second, "mpxs": result.megapixels_per_second,
                      "rss_before_mb": before / 1024, "rss_at": rss_at, "peak_mb": vm_kib("VmHWM") / 1024,
                      "flops": flops_per_image(loaded.model, PATCH), "network": network_rate(loaded, args.batch_size),
                      "conv_wall": max(conv_before[0], conv_after[0]), "conv_cpu": max(conv_before[1], conv_after[1])}))


def run_child(raster: Path, threads: int, read_ahead: int, channels_last: bool, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", "--raster", str(raster), "--threads", str(threads),
               "--read-ahead", str(read_ahead), "--batch-size", str(batch_size)] + ([] if channels_last else ["--nchw"])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=2048, help="small raster side in px")
    parser.add_argument("--large", type=int, default=20000, help="large raster side in px")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raster", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--read-ahead", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--nchw", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tile = Path(tmp) / "tile.tif"
        write_tile(tile)
        rasters = {}
        for name, size in (("small", args.small), ("large", args.large)):
            rasters[name] = Path(tmp) / f"{name}.vrt"
            write_mosaic_vrt(tile, size, rasters[name])
        # (raster, side, torch threads, strips read ahead, channels_last)
        configs = [("small", args.small, 1, 0, True), ("small", args.small, 1, 2, True),
                   ("small", args.small, 2, 0, True), ("small", args.small, 2, 2, False),
                   ("small", args.small, 2, 2, True), ("large", args.large, 2, 2, True)]
        print(f"model wrn-10-2 stem 2, {PATCH} px patches, stride {PATCH}, batch {args.batch_size}, CPU "
              f"({os.cpu_count()} cores, shared: timings are noisy)")
        header = ("raster", "torch threads", "reader thread", "layout", "patches", "wall s", "CPU s", "patches/s",
                  "Mpx/s", "patches per CPU-s", "network alone, patches per CPU-s", "FLOP-bound patches per CPU-s",
                  "% of bound (CPU)",
                  "RSS MB: before / at 10, 50, 90 % / peak")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, size, threads, read_ahead, channels_last in configs:
            r = run_child(rasters[name], threads, read_ahead, channels_last, args.batch_size)
            per_cpu = r["patches"] / r["cpu_seconds"]
            bound = r["conv_cpu"] / r["flops"]
            rss = " / ".join(f"{r['rss_at'].get(m, float('nan')):.0f}" for m in ("10%", "50%", "90%"))
            print(f"| {name} {size}×{size} | {threads} | {'yes' if read_ahead else 'no'} | "
                  f"{'channels_last' if channels_last else 'NCHW'} | {r['patches']} | "
                  f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['pps']:.0f} | {r['mpxs']:.2f} | {per_cpu:.0f} | "
                  f"{r['network']:.0f} | "
                  f"{bound:.0f} ({r['conv_cpu'] / 1e9:.1f} GFLOP per CPU-s ÷ {r['flops'] / 1e6:.1f} MFLOP) | "
                  f"{100 * per_cpu / bound:.0f} | {r['rss_before_mb']:.0f} / {rss} / {r['peak_mb']:.0f} |", flush=True)

if __name__ == "__main__":
    main()
