"""Pure JAX kernels that providers run (imported as ``gpunet.kernels``).

Every kernel is jitted, typed, deterministic given its inputs and a PRNG key,
and splittable: K chunks combined give the unsplit answer within the module's
``tolerance``. Each module has a NumPy ``reference`` and a ``cost`` model.

=============  ==============================================================
``probe``      matmul TFLOP/s (float32, bfloat16) and memory bandwidth of a
               device, in about a second; ``describe_device()``
``montecarlo`` European option price from N paths, chunked by path ranges
``nbody``      all-pairs gravity, leapfrog steps, energy drift
``render``     Mandelbrot escape counts, rendered in tiles that assemble exactly
``mlp``        small MLP classifier: init, loss, train_step (SGD, Adam),
               data-parallel gradients averaged over shards
``frames``     group-by aggregation: cuDF on a GPU where installed, else pandas
=============  ==============================================================

Importing this package imports neither JAX nor NumPy: the submodules load on
first attribute access (``gpunet.kernels.montecarlo``), so the worker can read
:data:`KERNELS` or :func:`chunks` cheaply. Nothing here imports gpunet.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._base import Chunk, Cost, KernelModule, Mismatch, Tolerance, allclose, chunks, compare, weighted_chunks

if TYPE_CHECKING:
    from . import frames, mlp, montecarlo, nbody, probe, render

#: The kernel modules, in the order the README describes them.
KERNELS: tuple[str, ...] = ("probe", "montecarlo", "nbody", "render", "mlp", "frames")

__all__ = [
    "KERNELS",
    "Chunk",
    "Cost",
    "KernelModule",
    "Mismatch",
    "Tolerance",
    "allclose",
    "chunks",
    "compare",
    "frames",
    "mlp",
    "montecarlo",
    "nbody",
    "probe",
    "render",
    "weighted_chunks",
]


def __getattr__(name: str) -> Any:
    if name in KERNELS:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(KERNELS))
