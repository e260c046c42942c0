"""Run every hostile-input case of the tests and print the markdown table of docs/reliability_inputs.md.

    .venv/bin/python bench/hostile_inputs_table.py            # CLI commands, then QGIS Processing algorithms
    .venv/bin/python bench/hostile_inputs_table.py --cli-only

The cases and inputs are those of tests/hostile_cases.py and tests/test_qgis_hostile_inputs.py; each
row is the message the entry point really gave, with the temporary folder shown as `…/`.  A row whose
outcome breaks the contract (not exactly one error, or a file left behind) is marked FAIL.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def clean(message: str, root: Path) -> str:
    message = message.replace(str(root) + "/", "…/").replace(str(root), "…")
    return re.sub(r"\s+", " ", message).replace("|", "\\|").strip()


def left_behind(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def cli_rows(inputs: dict[str, Path], root: Path) -> list[tuple[str, str, str, str]]:
    import pytest

    from tests.hostile_cases import CLI_CASES, error_lines, run_case

    rows = []
    for number, case in enumerate(CLI_CASES):
        out = root / "cli" / str(number)
        out.mkdir(parents=True)
        code, stderr = run_case(case, inputs, out, pytest.MonkeyPatch())
        errors = error_lines(stderr)
        ok = code == 2 and len(errors) == 1 and re.search(case.message, errors[0]) and not left_behind(out)
        message = errors[0].split(": error: ", 1)[-1] if errors else stderr.strip()[-200:]
        rows.append((f"`jem {case.command}`", case.bad_input, f"{code}" + ("" if ok else " FAIL"),
                     clean(message, root)))
    return rows


def qgis_rows(inputs: dict[str, Path], root: Path) -> list[tuple[str, str, str, str]]:
    import pytest
    from qgis.core import QgsApplication

    sys.path.append("/usr/share/qgis/python/plugins")
    app = QgsApplication([], False)
    app.initQgis()
    from processing.core.Processing import Processing

    Processing.initialize()
    import jem_qgis_plugin
    from tests.test_qgis_hostile_inputs import CASES, run_case

    plugin = jem_qgis_plugin.classFactory(None)
    plugin.initGui()
    rows = []
    for number, case in enumerate(CASES):
        out = root / "qgis" / str(number)
        out.mkdir(parents=True)
        message = run_case(case, inputs, out, pytest.MonkeyPatch())
        ok = message and re.search(case.message, message) and not left_behind(out)
        rows.append((f"`jem:{case.algorithm}`", case.bad_input, "exception" + ("" if ok else " FAIL"),
                     clean(message, root)))
    plugin.unload()
    return rows


def table(rows: list[tuple[str, str, str, str]], outcome: str) -> str:
    lines = [f"| Entry point | Bad input | {outcome} | Message |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cli-only", action="store_true")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    from tests.hostile_cases import build_inputs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_inputs(root / "inputs")
        print("### Command line (`jem …`): exit status and the one stderr line\n")
        print(table(cli_rows(inputs, root), "Exit"))
        if not args.cli_only:
            print("\n### QGIS Processing (`processing.run('jem:…')`): the QgsProcessingException\n")
            print(table(qgis_rows(inputs, root), "Result"))


if __name__ == "__main__":
    main()
