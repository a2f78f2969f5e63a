"""gpunet: borrow a GPU from a notebook.

``%load_ext gpunet`` adds the ``%gpunet`` / ``%%gpunet`` magics; the same network
is reachable from Python::

    import gpunet
    with gpunet.connect() as net:          # embedded local network
        print(net.run(lambda x: x * 2, 21))

``import gpunet`` stays light: Dask, IPython and JAX load on first use.
"""

from __future__ import annotations

import typing as _typing

from gpunet.errors import (
    BudgetError,
    CellError,
    CellSyntaxError,
    CellTimeoutError,
    ConnectError,
    CreditsError,
    GpunetError,
    MissingOutputError,
    PackageError,
    PlacementError,
    ProviderDataError,
    ProviderTaskError,
    RemoteCellError,
    ResultTooLargeError,
    UnpicklableInputError,
    UnsupportedResultError,
    VerificationError,
    WorkerLostError,
)

if _typing.TYPE_CHECKING:  # pragma: no cover
    from gpunet.client.network import Network, connect, current, map, split
    from gpunet.credits import CreditClient
    from gpunet.ui.dashboard import ProviderDashboard
    from gpunet.ui.receipt import SessionReceipt
    from gpunet.ui.usage import SessionUsage

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CellError",
    "CellSyntaxError",
    "CellTimeoutError",
    "ConnectError",
    "CreditClient",
    "CreditsError",
    "GpunetError",
    "MissingOutputError",
    "Network",
    "PackageError",
    "PlacementError",
    "ProviderDashboard",
    "ProviderDataError",
    "ProviderTaskError",
    "RemoteCellError",
    "ResultTooLargeError",
    "SessionReceipt",
    "SessionUsage",
    "UnpicklableInputError",
    "UnsupportedResultError",
    "VerificationError",
    "WorkerLostError",
    "connect",
    "current",
    "load_ipython_extension",
    "map",
    "split",
    "unload_ipython_extension",
]

# Names served on first use, so that `import gpunet` does not import Dask.
_LAZY = {
    "Network": "gpunet.client.network",
    "connect": "gpunet.client.network",
    "current": "gpunet.client.network",
    "map": "gpunet.client.network",
    "split": "gpunet.client.network",
    "SessionUsage": "gpunet.ui.usage",
    "CreditClient": "gpunet.credits",
    "ProviderDashboard": "gpunet.ui.dashboard",
    "SessionReceipt": "gpunet.ui.receipt",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gpunet' has no attribute {name!r}")


def load_ipython_extension(ipython: _typing.Any) -> None:
    """Called by ``%load_ext gpunet``: registers the ``%gpunet`` magics."""
    from gpunet.extensions.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: _typing.Any) -> None:
    """Called by ``%unload_ext gpunet``: disconnects a network the magics started."""
    from gpunet.extensions.magics import unload_ipython_extension as unload

    unload(ipython)
