"""Writing output files safely: a failed run never leaves a half-written file or part of its result set.

- `atomic_write(path, write)`: write to a temporary name beside the target, then rename.
- `publish(tmp, path)`: that rename, with ordinary file permissions.
- `written_together(*paths)`: the outputs of one run are kept all or none.
- `check_output_folders(*paths)`: refuse missing output folders before any work.
- `write_json(path, data)`: an indented JSON file, atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import JEMError


def check_output_folders(*paths: str | os.PathLike | None) -> None:
    """JEMError when an output's folder is missing: entry points call it before any work, not after training."""
    for path in paths:
        if path is not None and not Path(path).parent.is_dir():
            raise JEMError(f"Output folder '{Path(path).parent}' does not exist. Create it or choose another path.")


@contextmanager
def written_together(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Outputs of one run: if the block fails, those it already wrote are removed again, so a failed
    run never leaves part of its result set (a plot without its numbers).  Files the block did not
    replace (another run's) are kept."""
    def identity(path: Path) -> tuple[int, int] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    check_output_folders(*paths)
    before = {Path(p): identity(Path(p)) for p in paths if p is not None}
    try:
        yield
    except BaseException:
        for path, was in before.items():
            if identity(path) not in (None, was):
                path.unlink(missing_ok=True)
        raise


def publish(tmp_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a finished temporary file onto its real name, with ordinary permissions.

    mkstemp creates files readable by their owner only; outputs are shared files (0666 & ~umask).
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, path)


def atomic_write(path: str | os.PathLike, write: Any, suffix: str = "") -> None:
    """Call write(tmp_path), then rename tmp_path → path; remove tmp_path if anything fails."""
    path = Path(path)
    check_output_folders(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp_name)
        publish(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise JEMError(f"Could not write '{path}': {error.strerror or error}. "
                       "Check free space and permissions.") from error
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), suffix=".json")
