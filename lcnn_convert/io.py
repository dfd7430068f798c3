"""Writing outputs safely: single files atomically, and an output directory as one locked unit.

An output directory is only ever written by the run that holds its lock, only replaced when it is
a previous output of lcnn-convert (its marker file says so), and its previous contents stay in
place until the new ones are complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import LcnnError

# Hidden names lcnn-convert keeps inside every output directory.
MARKER_FILE = ".lcnn-convert"  # JSON: the files the last completed run wrote
LOCK_FILE = ".lcnn-convert.lock"  # held (fcntl) for a run's lifetime; names the run that holds it
STAGING_DIR = ".lcnn-partial"  # the run in progress writes here; a fine-tuning run's checkpoints survive in it
BOOKKEEPING = (MARKER_FILE, LOCK_FILE, STAGING_DIR)
# What earlier versions (before the marker) wrote: a directory holding only these and a report.json
# that names lcnn_convert_version is recognised as an earlier output.
LEGACY_OUTPUTS = frozenset(
    {
        "model.onnx",
        "model.onnx.data",
        "model.safetensors",
        "report.json",
        "curvature.png",
        "training.png",
        "checkpoint.pt",
    }
)
# errno values that mean "the disk (or a quota, or a file size limit) is full"
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The file gets the permissions any new file gets under the umask, whatever the writer used
    (mkstemp and some writers create files 0600).
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def write_error(error: OSError, what: str | Path) -> LcnnError:
    """The one-line error for a failed write (a full disk above all)."""
    if error.errno in NO_SPACE:
        return LcnnError(
            f"cannot write {what}: no space left ({os.strerror(error.errno)}); free some space or choose another -o"
        )
    return LcnnError(f"cannot write {what}: {error.strerror or error}")


def underlying_os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind a writer's failure: the error itself, one in its cause/context chain (torch's
    writer turns a failed Python write into RuntimeError), or one named as "os error N" (safetensors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        named = re.search(r"os error (\d+)", str(error))
        if named:
            number = int(named.group(1))
            return OSError(number, os.strerror(number))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def out_of_space(error: BaseException) -> LcnnError | None:
    """The one-line error when ``error`` comes from a full disk (or quota, or file size limit), else None."""
    cause = underlying_os_error(error)
    if cause is None or cause.errno not in NO_SPACE:
        return None
    return write_error(cause, cause.filename or "the output")


def _holder_description() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["lcnn-convert", *sys.argv[1:]])[:300],
    }


def _describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not yet said who it is"


def _is_previous_output(path: Path, entries: list[str]) -> bool:
    if MARKER_FILE in entries:
        return True
    visible = [name for name in entries if name not in BOOKKEEPING]
    if "report.json" not in visible or not set(visible) <= LEGACY_OUTPUTS:
        return False
    try:
        return "lcnn_convert_version" in json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return False


def _previous_files(path: Path) -> set[str]:
    """The files the previous completed run wrote here (the only ones a new run may replace)."""
    try:
        written = json.loads((path / MARKER_FILE).read_text())["files"]
        return {name for name in written if isinstance(name, str) and "/" not in name and name not in BOOKKEEPING}
    except (OSError, ValueError, KeyError, TypeError):
        return {entry.name for entry in path.iterdir() if entry.name in LEGACY_OUTPUTS}


class OutputDirectory:
    """The output directory of one run, locked from ``open`` until the run ends.

    The run writes into ``staging`` (a hidden folder inside the directory: the same file system,
    so a mount point or a symlinked directory works, and nothing is renamed but files). ``commit``
    moves the new files into place, removes the files of the previous output that the new one does
    not have, and writes the marker last. A failed run leaves the directory as it was; a
    fine-tuning run that stopped keeps its staging folder (its checkpoint), for ``--resume``.

    The lock is an flock on a file inside the directory: the kernel (or the NFS lock manager)
    releases it when the holder dies, so whether a run is alive never rests on a process id, and a
    run in another container or on another host sharing the directory is seen as alive.
    """

    def __init__(
        self, path: Path, staging: Path, lock: IO[str], created: bool, lock_created: bool, resumable: bool
    ) -> None:
        self.path = path
        self.staging = staging
        self._lock = lock
        self._created = created
        self._lock_created = lock_created
        self._resumable = resumable
        self.committed = False

    @classmethod
    def open(
        cls,
        destination: str | Path,
        overwrite: bool = False,
        resume: bool = False,
        resumable: bool = False,
        resume_file: str | None = None,
    ) -> OutputDirectory:
        """Lock ``destination`` and check that this run may write it.

        ``resume_file``: the checkpoint a resumable run keeps in the staging folder; one found there
        marks an interrupted run, which no run replaces without ``overwrite``.
        ``resumable``: this run writes such checkpoints, and keeps them when it fails (fine-tuning).
        ``resume``: continue the run whose ``resume_file`` sits in the staging folder (an interrupted
        run) or in the directory itself (a finished one, whose output stays until the new one is complete).
        """
        path = Path(destination).expanduser().resolve()  # a symlink: write where it points
        if path.exists() and not path.is_dir():
            raise LcnnError(f"output path {path} exists and is not a directory")
        created = not path.exists()
        lock_created = not (path / LOCK_FILE).exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = open(path / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run's lifetime
        except OSError as error:
            raise write_error(error, f"output dir {path}") from error
        try:
            # flock, not lockf: a POSIX lock is dropped when *any* descriptor of the file in this
            # process closes; Linux's NFS client maps flock onto the server's byte-range locks.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            lock.close()
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise LcnnError(
                    f"output dir {path} is in use by another lcnn-convert run ({_describe_holder(path / LOCK_FILE)}); "
                    "wait for it to end or choose another -o"
                ) from None
            raise LcnnError(f"cannot lock output dir {path}: {error.strerror or error}") from error
        directory = cls(path, path / STAGING_DIR, lock, created, lock_created, resumable)
        try:
            directory._claim(overwrite, resume, resume_file)
        except BaseException:
            directory._release(remove_created=True)
            raise
        return directory

    def _claim(self, overwrite: bool, resume: bool, resume_file: str | None) -> None:
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(json.dumps(_holder_description()))
        self._lock.flush()
        if not os.access(self.path, os.W_OK):
            raise LcnnError(f"cannot write output dir {self.path}: Permission denied")
        entries = sorted(entry.name for entry in self.path.iterdir())
        visible = [name for name in entries if name not in BOOKKEEPING]
        previous = _is_previous_output(self.path, entries)
        if visible and not previous:
            raise LcnnError(
                f"output dir {self.path} holds files lcnn-convert did not write (e.g. '{visible[0]}'); "
                "it only ever replaces its own outputs: choose another -o"
            )
        # The lock is ours, so a staging folder left here belongs to a run that has ended.
        interrupted = resume_file is not None and (self.staging / resume_file).is_file()
        if resume:
            if resume_file is None or not self._resumable:
                raise LcnnError("nothing to resume: this run writes no checkpoint")
            finished = previous and (self.path / resume_file).is_file()
            if not (interrupted or finished):
                raise LcnnError(f"nothing to resume: no {resume_file} in {self.path}")
            if not interrupted:
                self._fresh_staging()
                shutil.copy2(self.path / resume_file, self.staging / resume_file)
            else:
                self._drop_partial_files()
            return
        if interrupted and not overwrite:
            raise LcnnError(
                f"output dir {self.path} holds an interrupted fine-tuning run ({STAGING_DIR}/{resume_file}); "
                "pass --resume (with its --finetune options) to continue it, or --overwrite to replace it"
            )
        if visible and not overwrite:
            raise LcnnError(
                f"output dir {self.path} holds an earlier lcnn-convert output; pass --overwrite to replace it"
            )
        self._fresh_staging()

    def _fresh_staging(self) -> None:
        try:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        except OSError as error:
            raise write_error(error, f"output dir {self.path}") from error

    def _drop_partial_files(self) -> None:
        """What an atomic write (a file) or the ONNX export (a scratch dir) was writing when the
        interrupted run was killed."""
        for partial in self.staging.glob(".*.partial"):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)

    def commit(self, last: Iterable[str] = ()) -> Path:
        """Move the staged files into place (``last`` after all others), drop what the previous
        output had and this one has not, write the marker, and remove the staging folder."""
        last = list(last)
        new = sorted(
            entry.name for entry in self.staging.iterdir() if entry.is_file() and not entry.name.startswith(".")
        )
        order = [name for name in new if name not in last] + [name for name in last if name in new]
        previous = _previous_files(self.path)
        try:
            for name in order:
                os.replace(self.staging / name, self.path / name)
            for name in sorted(previous - set(new)):
                stale = self.path / name
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
            with atomic_file(self.path / MARKER_FILE) as temporary:
                temporary.write_text(json.dumps({"written_by": "lcnn-convert", "files": new}) + "\n")
        except OSError as error:
            raise write_error(error, f"output dir {self.path}") from error
        shutil.rmtree(self.staging, ignore_errors=True)
        self.committed = True
        return self.path

    def close(self, failed: bool) -> None:
        """End the run: on failure, keep a resumable run's checkpoints and drop everything else it wrote."""
        if failed and not self.committed:
            keep = (
                self._resumable
                and self.staging.is_dir()
                and any(entry.is_file() and not entry.name.startswith(".") for entry in self.staging.iterdir())
            )
            if not keep:
                shutil.rmtree(self.staging, ignore_errors=True)
        self._release(remove_created=failed)

    def _release(self, remove_created: bool) -> None:
        """Unlock; after a failure, also remove the lock file (and the directory) if this run made them."""
        if remove_created and self._lock_created:
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
            if self._created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only if empty
        with contextlib.suppress(OSError):
            self._lock.close()  # closing the file releases the lock

    def __enter__(self) -> OutputDirectory:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None or not self.committed)
