"""Splitting a batch over CPU threads changes speed only: same SGLD chains, seeded runs that repeat,
the caller's thread count restored, worker errors reaching the caller."""
from __future__ import annotations

import pytest
import torch

from jem_core.batch_split import MIN_SLICE, map_slices, slice_count
from jem_core.models import ModelSpec, build_model
from jem_core.sampler import SGLDConfig, run_chain


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # splitting needs ≥ 2 intra-op threads, whatever the CI machine has
    yield
    torch.set_num_threads(before)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="wrn-10-1", num_classes=4))


def test_slice_count_is_one_per_thread_on_the_cpu_only(two_threads):
    cpu = torch.device("cpu")
    assert slice_count(64, cpu) == 2
    assert slice_count(2 * MIN_SLICE - 1, cpu) == 1  # too small to be worth a second thread
    assert slice_count(64, cpu, enabled=False) == 1
    assert slice_count(64, torch.device("cuda")) == 1


def test_map_slices_covers_the_batch_in_order_and_restores_the_thread_count(two_threads):
    parts = map_slices(lambda i, part: (i, part.start, part.stop), 37, 3)
    assert parts == [(0, 0, 12), (1, 12, 25), (2, 25, 37)]
    assert torch.get_num_threads() == 2


def test_a_worker_error_reaches_the_caller(two_threads):
    def fail(i: int, part: slice) -> None:
        if i == 1:
            raise ValueError("slice 1 failed")

    with pytest.raises(ValueError, match="slice 1 failed"):
        map_slices(fail, 32, 2)
    assert torch.get_num_threads() == 2


def test_split_sgld_chains_equal_unsplit_ones_without_noise(two_threads, model):
    start = torch.rand(32, 3, 16, 16) * 2 - 1
    y = torch.arange(32) % 4
    config = SGLDConfig(steps=3, noise=0.0, sample_clamp=None)
    for labels in (None, y):
        split = run_chain(model, start, config, y=labels, split=True)
        whole = run_chain(model, start, config, y=labels, split=False)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
        assert not torch.equal(split, start)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert model.training


def test_split_sgld_with_noise_repeats_under_a_seed_and_each_slice_gets_its_own_noise(two_threads, model):
    start = torch.zeros(32, 3, 16, 16)
    config = SGLDConfig(steps=1, step_size=1e-12, noise=1.0, sample_clamp=None)  # samples ≈ pure noise
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(run_chain(model, start, config, split=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][:16], runs[0][16:])  # the two slices do not share a noise stream
    assert 0.9 < runs[0].std().item() < 1.1
