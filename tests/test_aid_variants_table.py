"""The AID variants table compares each variant with the default run measured at the same learning rate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from aid_table import variants_table  # noqa: E402


def run(method: str, accuracy: float, lr: float | None = None) -> dict:
    record = {"setting": "20", "method": method, "accuracy": accuracy, "ece": 0.05, "iterations": 900}
    return record | ({} if lr is None else {"lr": lr})


def write_variant(variants: Path, name: str, *records: dict) -> None:
    folder = variants / name
    folder.mkdir(parents=True)
    for record in records:
        (folder / f"20_{record['method']}_s0.json").write_text(json.dumps(record))


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {(row[0], row[2]): row[7:] for row in cells}


def test_variants_meet_the_default_of_their_own_learning_rate(tmp_path):
    variants = tmp_path / "aid_variants"
    defaults = {("20", "jem"): [run("jem", 0.47, 2e-3) | {"seed": 0}],
                ("20", "ce"): [run("ce", 0.50, 2e-3) | {"seed": 0}]}
    write_variant(variants, "lr1e-3", run("jem", 0.40, 1e-3), run("ce", 0.38))  # the previous default
    write_variant(variants, "sgld2", run("jem", 0.45))  # recorded before runs stored their rate: 1e-3
    write_variant(variants, "energy_every2", run("jem", 0.50, 2e-3))

    table = rows(variants_table(defaults, variants, variants / "lr1e-3"))

    assert table[("sgld2", "JEM")] == ["+5.0", "+7.0"]  # against the 1e-3 runs, not the 2e-3 default
    assert table[("energy_every2", "JEM")] == ["+3.0", "+0.0"]
    assert table[("lr1e-3", "JEM")] == ["-7.0", "+2.0"]  # the rate itself is the variant: the default, own CE
    assert table[("lr1e-3", "CE baseline")] == ["-12.0", "–"]
