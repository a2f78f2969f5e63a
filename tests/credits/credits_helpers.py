"""Helpers shared by the credit service tests (a module of its own, so that no other
directory's conftest.py can shadow it)."""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path

from gpunet.credits import CreditClient

DATA = Path(__file__).parent / "data"
_names = itertools.count()


def run_threads(threads: list[threading.Thread], timeout: float = 120) -> None:
    """Start every thread, then wait for each (at most ``timeout`` seconds apiece)."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def unique(prefix: str) -> str:
    """A fresh account name (the module-scoped services are shared between tests)."""
    return f"{prefix}-{next(_names)}-{uuid.uuid4().hex[:6]}"


class Party:
    """Clients of one service: the operator and helpers to make funded accounts."""

    def __init__(self, svc) -> None:
        self.svc = svc
        self.ops = CreditClient(svc.url, svc.operator_token)

    def account(self, role: str, *, credits: int = 0) -> tuple[str, CreditClient]:
        name = unique(role)
        token = self.ops.create_account(name, role)["token"]
        if credits:
            self.ops.mint(name, credits, key=f"mint-{name}")
        return name, CreditClient(self.svc.url, token)


def fill_names(value, names: dict[str, str]):
    """``value`` (a bad request's case) with each ``{name}`` in its strings replaced by ``names[name]``."""
    if isinstance(value, str):
        for k, v in names.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [fill_names(v, names) for v in value]
    if isinstance(value, dict):
        return {k: fill_names(v, names) for k, v in value.items()}
    return value
