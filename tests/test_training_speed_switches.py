"""Speed switches change speed, not results; the speed benchmark runs and reports its ratio."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jem_core import JEMError
from jem_core.models import ModelSpec, SpeedOptions, apply_speed_options, build_model
from jem_core.sampler import ReplayBuffer, SGLDConfig, SGLDSampler, UniformInit, run_chain

REPO = Path(__file__).resolve().parents[1]


def model_pair(options: SpeedOptions, device: str = "cpu"):
    torch.manual_seed(0)
    plain = build_model(ModelSpec(arch="wrn-10-1", num_classes=4))
    fast = build_model(ModelSpec(arch="wrn-10-1", num_classes=4))
    fast.load_state_dict(plain.state_dict())
    return plain.to(device), apply_speed_options(fast, options, torch.device(device))


def test_channels_last_gives_the_same_logits_energies_and_sgld_gradients():
    plain, fast = model_pair(SpeedOptions(channels_last=True, amp="off"))
    assert fast.features.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    grads = []
    for model in (plain, fast):
        xr = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(model.energy(xr).sum(), xr)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_stays_close_and_returns_float32():
    plain, fast = model_pair(SpeedOptions(amp="bf16"))
    x = torch.randn(4, 3, 16, 16)
    out = fast(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain(x), rtol=0.05, atol=0.05)
    assert not torch.equal(out, plain(x))  # it really ran in bf16


def test_autocast_defaults_off_on_cpu_on_for_cuda_and_bad_modes_are_refused():
    assert SpeedOptions().autocast_dtype(torch.device("cpu")) is None
    assert SpeedOptions().autocast_dtype(torch.device("cuda")) is torch.bfloat16
    assert SpeedOptions(amp="off").autocast_dtype(torch.device("cuda")) is None
    with pytest.raises(JEMError, match="mixed-precision"):
        SpeedOptions(amp="fp8")


def test_in_place_sgld_matches_out_of_place_and_computes_no_weight_gradients():
    plain, _ = model_pair(SpeedOptions())
    config = SGLDConfig(steps=3, grad_clip=0.5, sample_clamp=1.5)
    start = torch.rand(6, 3, 16, 16) * 2 - 1
    samples = []
    for fused in (True, False):
        torch.manual_seed(1)
        samples.append(run_chain(plain, start, config, fused=fused))
    torch.testing.assert_close(samples[0], samples[1], rtol=0, atol=1e-6)
    assert not torch.equal(samples[0], start) and samples[0].abs().max() <= 1.5
    assert all(p.grad is None and p.requires_grad for p in plain.parameters())

    saturation = []
    for clamp in (4.0, 0.01):  # a clamp inside the init range pins values: the divergence signal
        buffer = ReplayBuffer(UniformInit((3, 16, 16)), 8, 4, torch.device("cpu"))
        sampler = SGLDSampler(plain, SGLDConfig(steps=2, sample_clamp=clamp), buffer)
        sampler.sample(4)
        saturation.append(float(sampler.last_saturation))
    assert saturation[0] == 0.0 and saturation[1] > 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_channels_last_bf16_training_step():
    plain, fast = model_pair(SpeedOptions(), device="cuda")
    assert fast.autocast_dtype is torch.bfloat16
    x = torch.randn(4, 3, 16, 16, device="cuda")
    torch.testing.assert_close(fast(x), plain(x), rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_training_speed_benchmark_runs_and_prints_the_speedup():
    out = subprocess.run([sys.executable, "bench/training_speed.py", "--arch", "wrn-10-1", "--image-size", "16",
                          "--batch", "4", "--steps", "2", "--buffer", "16", "--repeats", "1", "--ablation"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    speedup = re.fullmatch(r"speedup: (\d+\.\d\d)", lines[-1])
    assert speedup
    assert "measured conv throughput" in out.stdout
    # Each row: label, s/iter, ratio to the reference, SGLD s, image-steps/s, % conv peak.
    number = r"(\d+\.\d+)"
    rows = {}
    for line in lines:
        match = re.fullmatch(rf"(.+?)\s+{number}\s+{number}x\s+{number}\s+{number}\s+(\d+)%", line)
        if match:
            label, per_iter, ratio, chain, rate, _ = match.groups()
            rows[label] = (float(per_iter), float(ratio), float(chain), float(rate))
    assert set(rows) == {"reference (original JEM loop)", "ours, all switches off", "ours, fused/in-place only",
                         "ours, channels_last only", "ours, batch split only", "ours, defaults without batch split",
                         "ours, defaults"}
    reference = rows["reference (original JEM loop)"][0]
    for label, (per_iter, ratio, chain, rate) in rows.items():
        # A chain of this tiny net can print as 0.00 s; its image-steps/s shows it ran.
        assert chain >= 0 and rate > 0, label
        # The ratio column is the reference's time over the row's, within the rounding of the printed times.
        low = (reference - 0.005) / (per_iter + 0.005) - 0.005
        high = (reference + 0.005) / max(per_iter - 0.005, 1e-9) + 0.005
        assert low <= ratio <= high, label
    assert rows["reference (original JEM loop)"][1] == 1.0
    assert float(speedup.group(1)) == pytest.approx(rows["ours, defaults"][1], abs=0.011)


def test_loaded_models_run_channels_last_in_float32_with_the_saved_logits(tmp_path):
    from jem_core.model_file import ModelMeta, load_model, save_model

    plain, _ = model_pair(SpeedOptions())
    save_model(tmp_path / "m.pt", plain, ModelMeta(["a", "b", "c", "d"], ["r", "g", "b"], 16, [0.0] * 3, [1.0] * 3))
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.model.channels_last and loaded.model.autocast_dtype is None
    assert loaded.model.features.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), plain(x), rtol=1e-4, atol=1e-5)
