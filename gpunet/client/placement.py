"""Placement: which Dask resources a job asks for, whether any worker can ever run
it, and why it still waits. Pure functions of the scheduler's view of its workers.

Every gpunet worker offers one ``device`` slot (its GPU, or the CPU where it has
none); GPU workers also offer ``GPU`` (count) and ``GPU_MEM`` (bytes). A job
without ``gpus`` asks only for a slot, so it runs on CPU workers where a network
has no GPU.
"""

from __future__ import annotations

from typing import Any

from gpunet.errors import OptionError, PlacementError
from gpunet.wire import DEVICE_RESOURCE, GPU_MEMORY_RESOURCE, GPU_RESOURCE
from gpunet.worker.device import format_bytes, parse_size

#: Scheduler info of a worker, as ``Client.scheduler_info()["workers"][address]``.
WorkerView = dict[str, Any]


def resources_for(*, gpus: int | None = None, gpu_mem: int | str | None = None) -> dict[str, float]:
    """The Dask resources a job asks for: one device slot, and GPUs / GPU memory
    when asked (``gpu_mem`` in bytes, or a size like ``"40GB"``)."""
    resources: dict[str, float] = {DEVICE_RESOURCE: 1}
    if gpus is not None:
        if gpus < 1:
            raise PlacementError(f"--gpus must be at least 1, got {gpus}")
        resources[GPU_RESOURCE] = gpus
    if gpu_mem is not None:
        resources.setdefault(GPU_RESOURCE, 1)
        resources[GPU_MEMORY_RESOURCE] = size(gpu_mem)
    return resources


def size(value: int | str) -> int:
    """A size in bytes from an int or a text like ``"40GB"``; :class:`OptionError` naming a bad one."""
    if isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise OptionError(f"--gpu-mem: {exc}") from None


def satisfies(offered: dict[str, float], asked: dict[str, float]) -> bool:
    """Whether a worker offering ``offered`` resources can run a job asking for ``asked``."""
    return all(offered.get(name, 0) >= amount for name, amount in asked.items())


def can_ever_run(resources: dict[str, float], workers: dict[str, WorkerView]) -> bool:
    """Whether a connected worker can run a job asking for ``resources`` (when it is free)."""
    return any(satisfies(info.get("resources") or {}, resources) for info in workers.values())


def show_resources(resources: dict[str, float]) -> str:
    """{"device": 1, "GPU_MEM": 4e10} -> 'GPU_MEM=37.3 GiB, device=1'."""
    parts = []
    for name, amount in sorted(resources.items()):
        parts.append(f"{name}={format_bytes(amount)}" if name == GPU_MEMORY_RESOURCE else f"{name}={amount:g}")
    return ", ".join(parts) or "no resources"


def never_runs_message(asked: dict[str, float], workers: dict[str, WorkerView]) -> str:
    """Why no connected worker can ever run a job asking for ``asked`` (there are workers)."""
    wants_gpu = asked.get(GPU_RESOURCE, 0) > 0 or asked.get(GPU_MEMORY_RESOURCE, 0) > 0
    with_gpus = [info for info in workers.values() if (info.get("resources") or {}).get(GPU_RESOURCE, 0) > 0]
    if wants_gpu and not with_gpus:
        return (f"no worker has a GPU: this job asks for {show_resources(asked)}, and the {len(workers)} connected "
                "worker(s) are CPU devices (%gpunet status lists them). Leave out --gpus / --gpu-mem to run it on "
                "a CPU worker, or connect to a network whose providers offer GPUs (gpunet provide on a GPU host).")
    largest = max(workers.values(), key=lambda info: tuple(
        (info.get("resources") or {}).get(name, 0) for name in sorted(asked)))
    return (f"no worker can ever run this: it asks for {show_resources(asked)}, and the largest of the "
            f"{len(workers)} worker(s) has {show_resources(largest.get('resources') or {})} ({largest.get('name')}). "
            "Ask for less (--gpus / --gpu-mem), or connect to a network with bigger devices.")


def waiting_reason(resources: dict[str, float], workers: dict[str, WorkerView],
                   processing: dict[str, Any], allowed: list[str] | None = None) -> str:
    """Why a job asking for ``resources`` has not started: which workers could run
    it (among ``allowed``) and how many of them are busy (``processing``: tasks per worker)."""
    fit = [address for address, info in workers.items()
           if satisfies(info.get("resources") or {}, resources) and (allowed is None or address in allowed)]
    busy = [address for address in fit
            if len(processing.get(address, ())) >= (workers[address].get("resources") or {}).get(DEVICE_RESOURCE, 1)]
    wanted = show_resources(resources)
    if not workers:
        return (f"waiting for a worker with {wanted}: no worker is connected now (a provider reconnecting, "
                "or workers restarting)")
    if not fit:
        return f"waiting for a worker with {wanted} (none is connected now)"
    state = "all busy" if len(busy) == len(fit) else f"{len(busy)} busy"
    if len(fit) == 2 and len(busy) == 2:
        state = "both busy"
    return f"waiting for a worker with {wanted} ({len(fit)} such worker{'s' * (len(fit) != 1)}, {state})"


def capable_workers(capabilities: dict[str, dict[str, Any]], *, min_tflops: float) -> list[str]:
    """Addresses of workers whose measured float32 matmul rate is at least
    ``min_tflops``; :class:`PlacementError` naming the best when there is none."""
    capable = [address for address, cap in capabilities.items() if cap["tflops_f32"] >= min_tflops]
    if not capable:
        best = max(capabilities.items(), key=lambda item: item[1]["tflops_f32"], default=None)
        offer = (f"the best, {best[0]}, measures {best[1]['tflops_f32']:.3f} TFLOP/s" if best
                 else "no connected worker reported a believable measurement")
        raise PlacementError(f"no worker can ever run this: it asks for at least {min_tflops:g} TFLOP/s "
                             f"(float32 matmul) and {offer}. Ask for less with --min-tflops.")
    return capable
