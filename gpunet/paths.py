"""Where gpunet keeps its files: one resolver for every part that writes to disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Environment variable that moves gpunet's data dir (tests point it at a temp dir).
DATA_DIR_ENV = "GPUNET_DATA_DIR"


def data_dir() -> Path:
    """The user's data dir for gpunet: ``GPUNET_DATA_DIR`` where set, else the
    platform's user data dir (``~/.local/share/gpunet`` on Linux)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("gpunet", appauthor=False))


@contextlib.contextmanager
def scratch_data_dir(prefix: str = "gpunet-scratch-") -> Iterator[Path]:
    """A data dir of its own for a run that should leave nothing behind (a benchmark's
    embedded networks, their ledgers and run folders): ``GPUNET_DATA_DIR`` points at a fresh
    temp dir, which processes started meanwhile inherit, and is restored and removed after."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    before = os.environ.get(DATA_DIR_ENV)
    os.environ[DATA_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop(DATA_DIR_ENV, None)
        else:
            os.environ[DATA_DIR_ENV] = before
        shutil.rmtree(folder, ignore_errors=True)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file only its owner can read (mode 600 from the start: keys and
    tokens), replacing what was there at once (a new file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)
