"""Where gpunet keeps its files: one resolver for every part that writes to disk."""

from __future__ import annotations

import os
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
