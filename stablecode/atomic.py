"""Write-then-rename: a reader (or a resumed run) sees the old file or the new one, never half of one.

Torch-free on purpose: data preparation, evaluation and the attribution index write their files
through this module without importing the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write by name (torch.save, savefig, ...).

    On a clean exit it is fsynced and renamed over `path`; on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the result private
        os.close(fd)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """`open(path, mode)` for writing, replaced atomically when the block ends without an error."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files; mode must start with 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(staging: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move a fully written `staging` directory to `destination`, replacing it as atomically as POSIX allows.

    POSIX cannot swap two directories in one step: the old one is renamed aside first, so a crash in
    between leaves `.<name>.old` (removed by the next replacement) and the new directory not yet there."""
    destination = Path(destination)
    old = destination.with_name(f".{destination.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        os.replace(destination, old)
    os.replace(staging, destination)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_directory(destination: str | os.PathLike, tag: str = "tmp") -> Iterator[Path]:
    """An empty directory beside `destination` to fill; on a clean exit its files are fsynced and it
    replaces `destination` (see replace_directory). On an exception it is removed."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=f".{tag}"))
    try:
        yield staging
        mask = _umask()
        for file in staging.rglob("*"):
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o666 & ~mask)
                _fsync(file)
            elif file.is_dir():
                os.chmod(file, 0o777 & ~mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would make the result private
        replace_directory(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
