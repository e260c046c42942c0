"""`jem COMMAND --help` names the default of every option, for every sub-command (issue 14)."""
from __future__ import annotations

import argparse

import pytest

from jem_core.cli import build_parser, main, shows_default


def subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_help(help_text: str, action: argparse.Action) -> str:
    """The rendered entry of one option in --help, whitespace collapsed (entries wrap over lines)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(", ".join(action.option_strings)))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")
                or not lines[i].strip()), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_help_shows_every_default(command):
    parser = subparsers()[command]
    help_text = parser.format_help()
    checked = 0
    for action in parser._actions:
        if shows_default(action):
            entry = option_help(help_text, action)
            default = action.default if not isinstance(action.default, list) else ",".join(map(str, action.default))
            assert "default" in entry and str(default) in entry, f"jem {command} {action.option_strings[0]}: {entry}"
            checked += 1
    assert checked or command == "report", f"jem {command} has no option with a default?"


def test_help_formatter_adds_the_default_once():
    parser = subparsers()["map"]
    help_text = " ".join(parser.format_help().split())
    assert help_text.count("(default: 64)") == 1  # --batch-size
    assert "(default: patch) (default" not in help_text


def test_demo_with_missing_assets_is_one_clear_error(tmp_path, capsys):
    assert main(["demo", "--demo-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "demo assets are missing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
