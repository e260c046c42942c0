"""Hostile inputs through every `jem` command: one clear error line, exit status 2, nothing left behind.

The bad inputs are built in tests/hostile_cases.py (shared with bench/hostile_inputs_table.py, which
prints the table of docs/reliability_inputs.md from these same runs).
"""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from jem_core import JEMError
from jem_core.mapping import map_raster
from tests.hostile_cases import CLI_CASES, HUGE_SIDE, CliCase, build_inputs, error_lines, run_case, run_cli_subprocess


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("hostile"))


def files_in(folder: Path) -> list[str]:
    """Every file left under folder, hidden temp files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CLI_CASES, ids=[f"{c.command}: {c.bad_input}" for c in CLI_CASES])
def test_bad_input_gives_one_clear_error_and_no_output(case: CliCase, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    code, stderr = run_case(case, inputs, out, monkeypatch)
    errors = error_lines(stderr)
    assert code == 2, stderr
    assert len(errors) == 1 and errors[0].startswith(f"jem {case.command}: error: "), stderr
    assert re.search(case.message, errors[0]), errors[0]
    assert "Traceback" not in stderr
    assert files_in(out) == [], "partial output or stale temp file left behind"


# GDAL prints its own errors on stderr for these (truncated strips, bogus headers) unless the CLI silences it.
SUBPROCESS_CASES = [("map", "raster: corrupt bytes"), ("map", "model: truncated"), ("map", "raster: truncated GeoTIFF"),
                    ("ood", "raster: TIFF header declaring 10^6 x 10^6 px"), ("evaluate", "dataset: truncated GeoTIFF")]


@pytest.mark.parametrize("command,bad_input", SUBPROCESS_CASES)
def test_subprocess_exit_status_2_and_exactly_one_stderr_line(command, bad_input, inputs, tmp_path):
    case = next(c for c in CLI_CASES if (c.command, c.bad_input) == (command, bad_input))
    code, stderr = run_cli_subprocess(case.argv(inputs, tmp_path))
    assert code == 2
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"jem {command}: error: "), stderr
    assert files_in(tmp_path) == []


def test_nan_and_inf_pixels_are_nodata_not_an_error(inputs, tmp_path):
    """NaN/Inf in a float raster are nodata: patches touching them are skipped, the rest mapped."""
    out = tmp_path / "classes.tif"
    result = map_raster(inputs["good model"], inputs["raster: NaN/Inf pixels (float)"], out, read_ahead=0,
                        stretch="linear:0,255")
    import rasterio

    with rasterio.open(out) as dataset:
        classes = dataset.read(1)
    # 64 px raster, 16 px patches: NaN fills rows/cols 0-19 (patches (0..1, 0..1)), Inf band 1 rows/cols 40+ (2..3).
    bad = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3)}
    assert result.skipped_patches == len(bad) and result.patches == 16 - len(bad)
    assert all((classes[r, c] == 255) == ((r, c) in bad) for r in range(4) for c in range(4))


def huge_vrt_map(vrt: str, model: str, out: str) -> None:
    """Child process: map the 10^6 × 10^6 px VRT, cancelling after 3 batches; print peak RSS and the outcome."""
    from jem_core import Cancelled

    polls = iter(range(1_000_000))
    try:
        map_raster(model, vrt, Path(out) / "classes.tif", Path(out) / "confidence.tif", batch_size=16,
                   read_ahead=0, should_stop=lambda: next(polls) >= 3)
        print("finished")
    except Cancelled:
        print("cancelled")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)


@pytest.mark.slow
def test_huge_declared_raster_streams_with_bounded_memory_and_cancels_cleanly(inputs, tmp_path):
    """10^12 px declared in a 1 KB VRT: map starts at once, memory stays bounded, Cancel leaves no file."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
            "from tests.test_hostile_inputs import huge_vrt_map; huge_vrt_map(*sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, str(inputs["raster: VRT declaring 10^6 x 10^6 px"]),
                           str(inputs["good model"]), str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, peak_mb = done.stdout.split()
    assert outcome == "cancelled"
    # One strip of 3 bands × 16 rows × 10^6 px float32 is 192 MB; a whole-raster read would be 12 TB.
    assert int(peak_mb) < 3000, f"peak RSS {peak_mb} MB"
    assert files_in(tmp_path) == []
    assert inputs["raster: VRT declaring 10^6 x 10^6 px"].stat().st_size < 2000 and HUGE_SIDE ** 2 == 10 ** 12


def test_gdal_write_failure_during_map_leaves_no_file(inputs, tmp_path, monkeypatch):
    """A write GDAL only reports to its error handler (full disk) is an error, not a damaged map."""
    import ctypes
    import ctypes.util

    from jem_core import map_writer

    libgdal = ctypes.CDLL(ctypes.util.find_library("gdal"))  # the GDAL rasterio and osgeo use
    original = map_writer.MapOutputs.write

    def write_then_fail(self, row_off, arrays):
        original(self, row_off, arrays)
        libgdal.CPLError(3, 3, b"%s", b"_tiffWriteProc:No space left on device")  # CE_Failure, CPLE_FileIO

    monkeypatch.setattr(map_writer.MapOutputs, "write", write_then_fail)
    with pytest.raises(JEMError, match="No space left on device.*free space"):
        map_raster(inputs["good model"], inputs["good raster"], tmp_path / "classes.tif", read_ahead=0)
    assert files_in(tmp_path) == []


def test_unwritable_output_folder_is_a_clear_error(inputs, tmp_path, monkeypatch):
    """Temp files cannot be created (a read-only folder; tests run as root, so simulated)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(JEMError, match="Permission denied.*write permission"):
        map_raster(inputs["good model"], inputs["good raster"], tmp_path / "classes.tif", read_ahead=0)
    assert files_in(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod 000 folders; test_hostile_inputs covers it by "
                                              "simulating PermissionError instead")
def test_chmod_000_dataset_folder(inputs, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "class_a").mkdir()
    folder.chmod(0)
    try:
        code, stderr = run_cli_subprocess(["evaluate", str(inputs["good model"]), str(folder)])
    finally:
        folder.chmod(0o755)
    assert code == 2 and "permission denied" in stderr

