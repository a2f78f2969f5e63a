"""Every kernel module has the shape kernels._base.KernelModule describes."""

from __future__ import annotations

from gpunet.kernels import Chunk, Tolerance

from gpunet import kernels


def test_every_kernel_module_has_tolerance_cost_reference() -> None:
    for name in kernels.KERNELS:
        module = getattr(kernels, name)
        assert isinstance(module, kernels.KernelModule), name
        assert isinstance(module.tolerance, Tolerance), name
        assert "Cost model" in (module.__doc__ or ""), name
        assert set(module.__all__) <= set(dir(module)), name
    assert set(kernels.__all__) <= set(dir(kernels))
    assert Chunk(3, 4).stop == 7
