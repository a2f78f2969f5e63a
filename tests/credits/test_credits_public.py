"""The public surface of gpunet.credits stays small, honest and light to import."""

from __future__ import annotations

import subprocess
import sys

import gpunet.credits
from gpunet.errors import CreditsError


def test_all_names_exist_and_errors_derive_from_credits_error():
    for name in gpunet.credits.__all__:
        obj = getattr(gpunet.credits, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, CreditsError), name


def test_import_is_light():
    code = ("import sys, gpunet.credits; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'sqlalchemy', 'requests', 'cryptography') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_public_function_has_a_docstring():
    import inspect

    from gpunet.credits import _audit, _book, _client, _db, _ledger, _merkle, _process, _service, _store, _trust, _writer

    missing = []
    for mod in (_audit, _book, _client, _db, _ledger, _merkle, _process, _service, _store, _trust, _writer):
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                if not obj.__doc__:
                    missing.append(f"{mod.__name__}.{name}")
                if inspect.isclass(obj):
                    for mname, member in vars(obj).items():
                        if not mname.startswith("_") and inspect.isfunction(member) and not member.__doc__:
                            missing.append(f"{mod.__name__}.{name}.{mname}")
    assert missing == []
