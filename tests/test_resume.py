"""Resume: checkpoints hold the whole training state; a killed run continues where it stopped."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import UNTHREADED_SPEED, make_class_folder
from test_recovery import tiny_config, tiny_dataset

from jem_core import Cancelled, JEMError
from jem_core.checkpoint import load_checkpoint
from jem_core.model_file import load_model
from jem_core.training import SceneDataset, train

REPO = Path(__file__).resolve().parents[1]


def interrupt_at(iteration: int):
    """A progress callback that dies like Ctrl-C (not a cancel) at the given iteration."""
    seen = []

    def progress(fraction: float, message: str) -> None:
        seen.append(message)
        if len(seen) == iteration:
            raise KeyboardInterrupt

    return progress


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, one_thread):
    # Threaded float sums (oneDNN convolutions, batch-split chains, fused Adam) differ between identical runs at
    # 1e-7: the bit-for-bit comparison runs on one thread, without them.
    dataset = tiny_dataset()
    config = tiny_config(epochs=2, speed=UNTHREADED_SPEED)
    reference = train(dataset, config, checkpoint_path=tmp_path / "ref.ckpt")
    assert not (tmp_path / "ref.ckpt").exists()  # a finished run cleans up its checkpoint

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(dataset, config, checkpoint_path=ckpt, progress=interrupt_at(8))  # in epoch 2
    saved = load_checkpoint(ckpt)  # weights_only load of the whole training state
    assert saved["loop"]["epoch"] == 2 and saved["loop"]["iteration"] == 5
    assert saved["ranks"][0]["buffer"].shape == (48, 3, 12, 12)

    lines: list[str] = []
    resumed = train(dataset, config, checkpoint_path=ckpt, resume=True, log=lines.append)
    assert any("resumed from" in line and "epoch 2, iteration 5" in line for line in lines)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    # Same RNG streams, batch orders, replay buffer and optimiser state: the same run, bit for bit.
    for (name, a), b in zip(reference.loaded.model.state_dict().items(), resumed.loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not ckpt.exists()


def test_resume_refuses_other_settings_missing_and_crafted_checkpoints(tmp_path):
    dataset, config = tiny_dataset(), tiny_config(epochs=2)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(dataset, config, checkpoint_path=ckpt, progress=interrupt_at(7))
    with pytest.raises(JEMError, match="other settings.*arch 'wrn-10-1' → 'wrn-10-2'"):
        train(dataset, tiny_config(epochs=2, arch="wrn-10-2"), checkpoint_path=ckpt, resume=True)
    fewer = SceneDataset(dataset.images[:45], dataset.labels[:45], dataset.class_names, dataset.band_names,
                         dataset.value_range, [])
    with pytest.raises(JEMError, match="another dataset"):
        train(fewer, config, checkpoint_path=ckpt, resume=True)
    with pytest.raises(JEMError, match="No checkpoint"):
        train(dataset, config, checkpoint_path=tmp_path / "none.ckpt", resume=True)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    crafted = tmp_path / "evil.ckpt"
    with open(crafted, "wb") as handle:
        pickle.dump(Evil(), handle)
    torch.save({"format": "jem-eo-checkpoint", "format_version": 1, "payload": Evil()}, tmp_path / "evil2.ckpt")
    for path in (crafted, tmp_path / "evil2.ckpt"):
        with pytest.raises(JEMError, match="not a readable JEM-EO checkpoint"):
            load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_cancel_leaves_no_files(tmp_path):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 7

    with pytest.raises(Cancelled):
        train(tiny_dataset(), tiny_config(), out_path=tmp_path / "m.pt", should_stop=should_stop,
              checkpoint_path=tmp_path / "m.pt.ckpt", checkpoint_every_min=0)
    assert list(tmp_path.iterdir()) == []


# Runs `jem ARGS...` and SIGKILLs itself right after the first checkpoint of epoch 3 or later is
# published: the kill lands mid-run at a known point, however fast or slow the machine is.
KILL_AFTER_EPOCH_3 = """
import os, signal, sys
from jem_core.checkpoint import load_checkpoint
from jem_core.cli import main
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    real_replace(src, dst, *args, **kwargs)
    if str(dst).endswith(".ckpt") and load_checkpoint(dst)["loop"]["epoch"] >= 3:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reaches_the_same_final_epoch(tmp_path):
    data = make_class_folder(tmp_path / "scenes", classes=3, per_class=16, size=12)
    out = tmp_path / "model.pt"
    args = ["train", str(data), "--out", str(out), "--epochs", "8", "--arch", "wrn-10-1", "--stem-stride", "1",
            "--image-size", "12", "--batch-size", "4", "--sgld-batch-size", "4", "--buffer-size", "30",
            "--sgld-steps", "1", "--patience", "100", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH_3, *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    ckpt = Path(str(out) + ".ckpt")
    assert not out.exists()
    killed_at = load_checkpoint(ckpt)["loop"]
    assert 3 <= killed_at["epoch"] < 8

    command = [sys.executable, "-m", "jem_core", *args]
    second = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resumed from '{ckpt}' at epoch {killed_at['epoch']}" in second.stderr
    history = load_model(out).meta.train_config["history"]
    assert [r["epoch"] for r in history] == list(range(1, 9))
    assert not ckpt.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
