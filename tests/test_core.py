"""The maths and the contracts of the engine: energy, SGLD, semi-supervised labels, model files."""
from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jem_core import JEMError
from jem_core.data import choose_labelled, load_class_folder, split_dataset
from jem_core.model_file import ModelMeta, load_model, save_model
from jem_core.models import ARCHITECTURES, ModelSpec, build_model
from jem_core.sampler import ClassGaussianInit, ReplayBuffer, SGLDConfig, SGLDSampler, UniformInit, run_chain
from jem_core.training import TrainConfig, train
from tests.conftest import make_class_folder


def test_energy_is_minus_logsumexp_of_logits():
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=4))
    x = torch.randn(5, 3, 16, 16)
    logits = model(x)
    expected = -torch.log(torch.exp(logits.double()).sum(1))
    assert torch.allclose(model.energy(x).double(), expected, atol=1e-5)
    y = torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(model.class_energy(x, y), -logits[torch.arange(5), y])


@pytest.mark.parametrize("size", [32, 64, 72])
@pytest.mark.parametrize("bands", [1, 4, 13])
def test_any_size_and_band_count(size, bands):
    model = build_model(ModelSpec(arch="wrn-10-1", in_channels=bands, num_classes=3, stem_stride=2))
    assert model(torch.randn(2, bands, size, size)).shape == (2, 3)


def test_architectures_cover_cpu_and_paper_sizes():
    assert {"wrn-10-2", "wrn-16-2", "wrn-28-10"} <= set(ARCHITECTURES)
    with pytest.raises(JEMError, match="Unknown architecture"):
        ModelSpec(arch="resnet-50")


def test_sgld_lowers_energy():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=3))
    start = torch.rand(16, 3, 16, 16) * 2 - 1
    config = SGLDConfig(steps=20, step_size=1.0, noise=0.0, sample_clamp=None)
    before = model.energy(start).mean().item()
    after = model.energy(run_chain(model, start, config)).mean().item()
    assert after < before
    assert all(p.requires_grad for p in model.parameters()), "SGLD must unfreeze the parameters again"


def test_class_conditional_sampling_lowers_class_energy():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=3))
    y = torch.tensor([0, 1, 2, 1])
    start = torch.rand(4, 3, 16, 16) * 2 - 1
    out = run_chain(model, start, SGLDConfig(steps=10, noise=0.0, sample_clamp=None), y=y)
    assert (model.class_energy(out, y) < model.class_energy(start, y)).all()


def test_replay_buffer_is_persistent_and_class_conditional():
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=3))
    buffer = ReplayBuffer(UniformInit((3, 8, 8)), size=30, num_classes=3, device=torch.device("cpu"))
    sampler = SGLDSampler(model, SGLDConfig(steps=1, reinit_prob=0.0), buffer)
    y = torch.tensor([2, 2, 0])
    out = sampler.sample(3, y=y)
    assert out.shape == (3, 3, 8, 8)
    # Every sample went back into the buffer, into a slot of its own class (slot i holds class i mod 3).
    for sample, label in zip(out, y):
        slots = [i for i in range(len(buffer)) if torch.equal(buffer.images[i], sample)]
        assert slots and all(buffer.labels[i] == label for i in slots)
    assert buffer.labels.tolist() == [i % 3 for i in range(30)]
    starts, slots = buffer.draw(50, torch.full((50,), 1), reinit_prob=0.0)
    assert (buffer.labels[slots] == 1).all()


def test_informative_init_matches_class_statistics():
    torch.manual_seed(0)
    images = torch.cat([torch.full((40, 3, 16, 16), -1.0), torch.full((40, 3, 16, 16), 1.0)])
    images += 0.1 * torch.randn_like(images)
    labels = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    init = ClassGaussianInit(images, labels, num_classes=2, resolution=8)
    samples = init.sample(200, torch.ones(200, dtype=torch.long), torch.device("cpu"))
    assert samples.shape == (200, 3, 16, 16)
    assert abs(samples.mean().item() - 1.0) < 0.05


def test_split_is_deterministic_and_disjoint():
    labels = torch.arange(100) % 4
    a, b = split_dataset(labels, seed=3), split_dataset(labels, seed=3)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    parts = [set(a.train.tolist()), set(a.val.tolist()), set(a.test.tolist())]
    assert sum(map(len, parts)) == 100 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert not torch.equal(split_dataset(labels, seed=4).test, a.test)


def test_semi_supervised_never_sees_more_than_k_labels_per_class(class_folder, monkeypatch):
    import jem_core.training as training

    seen: list[torch.Tensor] = []
    original = training.training_step

    def spy(model, sampler, optimiser, inputs, labels, labelled_stream, *rest):
        seen.append(labels.clone())
        return original(model, sampler, optimiser, inputs, labels, labelled_stream, *rest)

    monkeypatch.setattr(training, "training_step", spy)
    dataset = load_class_folder(class_folder, 16)
    config = TrainConfig(arch="wrn-10-1", image_size=16, epochs=1, batch_size=8, sgld_batch_size=4,
                         labels_per_class=2, patience=None,
                         sgld=SGLDConfig(steps=1, buffer_size=30))
    train(dataset, config)
    visible = seen[0]
    assert (visible >= 0).sum() == 2 * dataset.num_classes
    for c in range(dataset.num_classes):
        assert (visible == c).sum() == 2
    split = split_dataset(dataset.labels, config.seed, config.val_fraction, config.test_fraction)
    assert (visible[split.test] == -1).all() and (visible[split.val] == -1).all()
    chosen = choose_labelled(split.train, dataset.labels, 2, config.seed)
    assert torch.equal(torch.nonzero(visible >= 0).squeeze(1), chosen)


def test_training_learns_and_model_file_round_trips(class_folder, tmp_path):
    dataset = load_class_folder(class_folder, 16)
    config = TrainConfig(arch="wrn-10-1", image_size=16, epochs=4, batch_size=8, sgld_batch_size=8,
                         lr=3e-3, warmup_iters=2, patience=None, sgld=SGLDConfig(steps=2, buffer_size=60))
    out = tmp_path / "model.pt"
    result = train(dataset, config, out_path=out)
    assert result.metrics["accuracy"] > 0.6, result.metrics
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "jem-eo-model"
    loaded = load_model(out)
    assert loaded.meta.class_names == dataset.class_names
    assert loaded.meta.band_names == ["red", "green", "blue"]
    assert loaded.meta.image_size == 16 and len(loaded.meta.mean) == 3
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded.model(x), result.loaded.model.cpu()(x), atol=1e-6)
    assert not list(tmp_path.glob(".model.pt*")), "no temporary file may be left behind"


def test_baseline_trains_without_sampler(class_folder, monkeypatch):
    chains = []
    original = SGLDSampler.sample

    def counted(self, *args, **kwargs):
        chains.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SGLDSampler, "sample", counted)
    dataset = load_class_folder(class_folder, 16)
    config = TrainConfig(arch="wrn-10-1", image_size=16, epochs=1, batch_size=8, baseline=True, patience=None,
                         sgld=SGLDConfig(steps=1, buffer_size=30))
    result = train(dataset, config)
    assert result.metrics["mode"] == "baseline" and result.metrics["iterations"] >= 1
    assert chains == [], "the CE baseline ran SGLD chains"
    jem = train(dataset, replace(config, baseline=False))  # the same run as a JEM does sample
    assert jem.metrics["mode"] == "jem" and len(chains) >= jem.metrics["iterations"]


def test_loading_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"")
    torch.save({"format": "jem-eo-model", "x": Exploit()}, evil)
    with pytest.raises(JEMError, match="not a readable JEM-EO model"):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (b"not a zip at all", "not a readable JEM-EO model"),
    (None, "does not exist"),
])
def test_bad_model_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(JEMError, match=message):
        load_model(path)


def test_foreign_and_future_model_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(JEMError, match="not a JEM-EO model file"):
        load_model(tmp_path / "other.pt")
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=2))
    meta = ModelMeta(["a", "b"], ["red", "green", "blue"], 16, [0.0] * 3, [1.0] * 3)
    save_model(tmp_path / "m.pt", model, meta)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(JEMError, match="version 99"):
        load_model(tmp_path / "future.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(JEMError, match="truncated"):
        load_model(tmp_path / "truncated.pt")


def test_dataset_errors(tmp_path):
    with pytest.raises(JEMError, match="does not exist"):
        load_class_folder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(JEMError, match="No class folders"):
        load_class_folder(tmp_path / "empty", 16)
    make_class_folder(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(JEMError, match="Only one class"):
        load_class_folder(tmp_path / "one", 16)
    bad = make_class_folder(tmp_path / "bad", classes=2, per_class=3)
    (bad / "class_a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(JEMError, match="broken.jpg"):
        load_class_folder(bad, 16)


def test_mismatched_band_counts_are_an_error(tmp_path):
    root = make_class_folder(tmp_path / "mixed", classes=2, per_class=3, suffix=".tif")
    make_class_folder(tmp_path / "four", classes=1, per_class=2, bands=4, suffix=".tif")
    (tmp_path / "four" / "class_a" / "img_000.tif").rename(root / "class_b" / "zz_four_bands.tif")
    with pytest.raises(JEMError, match="zz_four_bands.tif.*4 bands"):
        load_class_folder(root, 16)


def test_multiband_uint16_geotiffs(tmp_path):
    root = make_class_folder(tmp_path / "s2", classes=2, per_class=4, bands=13, suffix=".tif", dtype="uint16")
    dataset = load_class_folder(root, 16)
    assert dataset.images.shape == (8, 13, 16, 16)
    assert dataset.band_names[0] == "B1" and dataset.value_range[1] > 255


class RunsCode:
    """Pickles to a call of `function(*args)`: what a crafted model file runs when unpickled unsafely."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def crafted_model_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Model files that would create `marker` if loading ran code from them, hidden in four ways."""
    import builtins
    import zipfile

    exploit = RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    files = {name: tmp_path / f"{name}.pt" for name in ("legacy", "raw_pickle", "in_meta", "swapped_data_pkl")}
    torch.save({"format": "jem-eo-model", "x": exploit}, files["legacy"], _use_new_zipfile_serialization=False)
    files["raw_pickle"].write_bytes(pickle.dumps(exploit))
    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=2))
    meta = ModelMeta(["a", "b"], ["red", "green", "blue"], 16, [0.0] * 3, [1.0] * 3)
    save_model(tmp_path / "good.pt", model, meta)
    payload = torch.load(tmp_path / "good.pt", weights_only=True)
    payload["meta"]["metrics"] = {"accuracy": exploit}
    torch.save(payload, files["in_meta"])
    # A real model file whose data.pkl (the pickle inside the zip) is replaced by the exploit.
    with zipfile.ZipFile(tmp_path / "good.pt") as good, zipfile.ZipFile(files["swapped_data_pkl"], "w") as bad:
        for item in good.infolist():
            data = pickle.dumps(exploit, protocol=2) if item.filename.endswith("/data.pkl") else good.read(item)
            bad.writestr(item, data)
    return files


@pytest.mark.parametrize("variant", ["legacy", "raw_pickle", "in_meta", "swapped_data_pkl"])
def test_crafted_model_files_never_run_code(tmp_path, variant):
    marker = tmp_path / "code_ran"
    path = crafted_model_files(tmp_path, marker)[variant]
    if variant == "raw_pickle":  # control: the exploit is live, an unsafe load does run it
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(JEMError, match="not a readable JEM-EO model"):
        load_model(path)
    assert not marker.exists()


def test_crafted_model_file_through_the_cli_runs_no_code(tmp_path, capsys):
    from jem_core.cli import main

    marker = tmp_path / "code_ran"
    evil = crafted_model_files(tmp_path, marker)["swapped_data_pkl"]
    make_class_folder(tmp_path / "scenes", classes=2, per_class=2)
    assert main(["evaluate", str(evil), str(tmp_path / "scenes")]) == 2
    assert "not a readable JEM-EO model" in capsys.readouterr().err
    assert not marker.exists()


def test_every_torch_load_in_jem_core_is_weights_only():
    """A static guard: no jem_core module may call torch.load without weights_only=True."""
    import ast

    import jem_core

    calls = []
    for source in Path(jem_core.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and getattr(node.func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                calls.append((source.name, node.lineno, safe))
    assert calls, "no torch.load found: the guard is looking in the wrong place"
    assert all(safe for *_, safe in calls), [c for c in calls if not c[2]]


def test_model_files_get_ordinary_permissions(tmp_path):
    import os

    model = build_model(ModelSpec(arch="wrn-10-1", num_classes=2))
    meta = ModelMeta(["a", "b"], ["red", "green", "blue"], 16, [0.0] * 3, [1.0] * 3)
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "m.pt", model, meta)
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644
