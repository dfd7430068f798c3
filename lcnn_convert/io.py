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


class WorkingDirectory:
    """The output dir of a resumable run: checkpoints must outlive an interruption, so files are
    written in place (each atomically) rather than staged.

    A non-empty dir needs ``resume`` (and then must hold ``resume_file``) or ``overwrite``; with
    overwrite the old contents are only removed by ``clear()``, which the caller invokes once
    the inputs have been checked. A dir this run created is removed again if the run fails
    before writing anything into it.
    """

    def __init__(self, final: str | Path, overwrite: bool, resume: bool, resume_file: str) -> None:
        self.path = Path(final).expanduser().absolute()
        if self.path.exists() and not self.path.is_dir():
            raise LcnnError(f"output path {self.path} exists and is not a directory")
        non_empty = self.path.is_dir() and any(self.path.iterdir())
        if resume and not (self.path / resume_file).is_file():
            raise LcnnError(f"nothing to resume: no {resume_file} in {self.path}")
        if non_empty and not (resume or overwrite):
            raise LcnnError(f"output dir {self.path} is not empty; pass --overwrite to replace it or --resume")
        self.created = not self.path.exists()
        self._clear_pending = non_empty and overwrite and not resume
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LcnnError(f"cannot write output dir {self.path}: {error.strerror or error}") from error
        if not os.access(self.path, os.W_OK):
            raise LcnnError(f"cannot write output dir {self.path}: Permission denied")
        if resume:
            # what atomic_file (a file) or export_onnx (a scratch dir) was writing when the
            # interrupted run was killed
            for partial in self.path.glob(".*.partial"):
                if partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)
                else:
                    partial.unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove what an earlier run left (only with overwrite, only once)."""
        if not self._clear_pending:
            return
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        self._clear_pending = False

    def __enter__(self) -> WorkingDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None and self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
