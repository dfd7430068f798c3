"""Atomic writes: a file or a whole output directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LcnnError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _stale_stages(final: Path) -> Iterator[Path]:
    for stage in final.parent.glob(f".{final.name}.partial-*"):
        pid = stage.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            yield stage


class StagedDirectory:
    """Build an output directory in a hidden sibling, then move it into place in one rename.

    Checks up front that the destination may be written (so a run fails before doing any work),
    and never touches an existing non-empty directory unless ``overwrite`` is set; even then the
    old contents are only removed once the new ones are complete.
    """

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final).expanduser().absolute()
        if self.final.exists() and not self.final.is_dir():
            raise LcnnError(f"output path {self.final} exists and is not a directory")
        if self.final.is_dir() and any(self.final.iterdir()) and not overwrite:
            raise LcnnError(f"output dir {self.final} is not empty; pass --overwrite to replace it")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            for stale in _stale_stages(self.final):
                shutil.rmtree(stale, ignore_errors=True)
            self.path = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
        except OSError as error:
            raise LcnnError(f"cannot write output dir {self.final}: {error.strerror or error}") from error

    def commit(self) -> Path:
        backup = None
        if self.final.exists():
            backup = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, backup)
        os.replace(self.path, self.final)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()
