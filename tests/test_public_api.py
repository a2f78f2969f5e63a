"""The public surface stays small and honest: every name in __all__ exists."""

from __future__ import annotations

import subprocess
import sys

import gpunet


def test_all_names_exist():
    missing = [name for name in gpunet.__all__ if not hasattr(gpunet, name)]
    assert missing == []


def test_every_error_derives_from_gpunet_error():
    for name in gpunet.__all__:
        obj = getattr(gpunet, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, gpunet.GpunetError), name


def test_import_gpunet_is_light():
    code = "import sys, gpunet; print(sorted(m for m in ('distributed', 'jax', 'IPython') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
