"""DDP on the CPU (gloo): two processes train like one, each on its data and replay-buffer shard."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_recovery import tiny_config, tiny_dataset

from jem_core import distributed, training
from jem_core.checkpoint import load_checkpoint
from jem_core.model_file import load_model
from jem_core.training import train

CONFIG = dict(epochs=2, val_fraction=0.0, test_fraction=0.0)


def worker(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        training.remove_checkpoint = lambda run: None  # keep the last checkpoint to inspect its shards
        lines: list[str] = []
        result = train(tiny_dataset(), tiny_config(**CONFIG), out_path=Path(folder) / "ddp.pt", log=lines.append,
                       checkpoint_path=Path(folder) / "ddp.ckpt")
        torch.save({"state": result.loaded.model.state_dict(), "history": result.history, "log": lines},
                   Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_a_single_process_run(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single_lines: list[str] = []
    single = train(tiny_dataset(), tiny_config(**CONFIG), log=single_lines.append)

    # Gradients are averaged: both ranks end with identical weights although they saw different images.
    for name, weight in ranks[0]["state"].items():
        assert torch.equal(weight, ranks[1]["state"][name]), name
    # Rank 0 logs and writes the model; each rank runs half the iterations of one process per epoch.
    assert "6 iterations/epoch" in single_lines[0]
    assert "3 iterations/epoch, 2 processes" in ranks[0]["log"][0] and ranks[1]["log"] == []
    written = load_model(tmp_path / "ddp.pt")
    for name, weight in written.model.state_dict().items():
        assert torch.equal(weight, ranks[0]["state"][name]), name
    # Same behaviour as one process: losses in the same range, the same number of epochs.
    assert [r["epoch"] for r in ranks[0]["history"]] == [r["epoch"] for r in single.history] == [1, 2]
    for ddp, one in zip(ranks[0]["history"], single.history):
        assert abs(ddp["train_ce"] - one["train_ce"]) < 0.5
    # One checkpoint, written by rank 0, holding each rank's own replay-buffer shard.
    checkpoint = load_checkpoint(tmp_path / "ddp.ckpt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    shards = [r["buffer"] for r in checkpoint["ranks"]]
    assert shards[0].shape == shards[1].shape == (24, 3, 12, 12)
    assert not torch.equal(shards[0], shards[1])


def test_shards_are_disjoint_and_cover_everything():
    indices = torch.arange(11)
    parts = [distributed.shard(indices, distributed.DistContext(rank, 3)) for rank in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(11))
    assert distributed.current() == distributed.DistContext()  # no process group: a single process
