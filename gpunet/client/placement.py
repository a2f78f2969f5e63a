"""Placement: which Dask resources a job asks for, whether any worker can ever run
it, and why it still waits. Pure functions of the scheduler's view of its workers.

Every gpunet worker offers one ``device`` slot (its GPU, or the CPU where it has
none); GPU workers also offer ``GPU`` (count) and ``GPU_MEM`` (bytes). A job
without ``gpus`` asks only for a slot, so it runs on CPU workers where a network
has no GPU.
"""

from __future__ import annotations

import ipaddress
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
    free = free_workers(workers, processing)
    busy = [address for address in fit if address not in free]
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


# -- price: a rate is an offer, the notebook sets its limit ------------------------------------

#: What ``--prefer`` may name: which free worker within the price limit a job goes to first.
PREFERENCES = ("cheapest", "fastest")


def check_max_rate(max_rate: float, flag: str = "--max-rate") -> float:
    """``max_rate`` (a rate or price limit, credits per device-second) as a float;
    :class:`OptionError` naming ``flag`` for one that is not a positive number."""
    if isinstance(max_rate, bool) or not isinstance(max_rate, (int, float)) or not 0 < max_rate < float("inf"):
        raise OptionError(f"{flag} must be a positive number of credits per device-second, got {max_rate!r}")
    return float(max_rate)


def check_prefer(prefer: str) -> str:
    """``prefer`` when it is one of :data:`PREFERENCES`; :class:`OptionError` naming them otherwise."""
    if prefer not in PREFERENCES:
        raise OptionError(f"--prefer must be {' or '.join(PREFERENCES)}, got {prefer!r}")
    return prefer


def worker_rates(workers: dict[str, WorkerView], state: dict[str, Any]) -> dict[str, float]:
    """The rate each worker's provider asks (credits per device-second), from the scheduler's
    metering state: a registered provider's rate, or the network's default rate where it pays
    a default provider; a worker whose provider is not known yet has no price, and is left out."""
    known = state.get("providers") or {}
    default = state.get("default_rate") if state.get("default_provider") is not None else None
    rates = {}
    for address in workers:
        rate = (known.get(address) or {}).get("rate", default)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            rates[address] = float(rate)
    return rates


def within_limit(workers: dict[str, WorkerView], rates: dict[str, float], resources: dict[str, float],
                 max_rate: float) -> list[str]:
    """Addresses of workers that can run a job asking for ``resources`` and whose rate is at
    or below ``max_rate`` (the notebook's price limit)."""
    return sorted(address for address, info in workers.items()
                  if address in rates and rates[address] <= max_rate
                  and satisfies(info.get("resources") or {}, resources))


def over_limit_message(workers: dict[str, WorkerView], rates: dict[str, float], resources: dict[str, float],
                       max_rate: float, owners: dict[str, str] | None = None) -> str:
    """Why no worker may run a job asking for ``resources`` within the price limit ``max_rate``:
    which rates the workers able to run it ask, and what to set to run it."""
    owners = owners or {}
    able = {address: rates[address] for address, info in workers.items()
            if address in rates and satisfies(info.get("resources") or {}, resources)}
    if not able:
        return (f"no worker whose provider has a price can run a job asking for {show_resources(resources)} now "
                "(providers still registering?); try again in a moment, or see %gpunet status")
    asked: dict[float, set[str]] = {}
    for address, rate in able.items():
        asked.setdefault(rate, set()).add(owners.get(address, address))
    offers = "; ".join(f"{rate:g} ({', '.join(sorted(names))})" for rate, names in sorted(asked.items()))
    cheapest = min(asked)
    return (f"no provider at or below your price limit of {max_rate:g} credits per device-second can run this "
            f"(it asks for {show_resources(resources)}); the providers that can ask: {offers}. Nothing was sent. "
            f"To run it, raise the limit to at least {cheapest:g}: on this cell with --max-rate {cheapest:g} "
            f"(net.run(..., max_rate={cheapest:g})), or for the session with %gpunet connect --max-rate {cheapest:g} "
            f"(gpunet.connect(..., max_rate={cheapest:g})). Holds are priced at the limit.")


def preferred_workers(eligible: list[str], rates: dict[str, float], free: set[str], prefer: str = "cheapest",
                      speeds: dict[str, float] | None = None) -> list[str]:
    """Where a single job may go among ``eligible`` workers (all within the price limit):
    when some are ``free``, only the best of those by ``prefer`` (the lowest rate, or the
    highest measured ``speeds``; ties all kept); when none is, every eligible worker (it
    waits for the first to free up)."""
    candidates = [address for address in eligible if address in free]
    if not candidates:
        return list(eligible)
    if prefer == "fastest":
        speeds = speeds or {}
        best = max(speeds.get(address, 0.0) for address in candidates)
        return [address for address in candidates if speeds.get(address, 0.0) == best]
    best = min(rates[address] for address in candidates)
    return [address for address in candidates if rates[address] == best]


def free_workers(workers: dict[str, WorkerView], processing: dict[str, Any]) -> set[str]:
    """Workers with a device slot free now (``processing``: tasks per worker)."""
    return {address for address, info in workers.items()
            if len(processing.get(address, ())) < (info.get("resources") or {}).get(DEVICE_RESOURCE, 1)}


# -- distinct hosts: copies of a verified job -----------------------------------------------


def host_of(address: str) -> str:
    """The host a worker's address names: its IPv4 address or name, or for IPv6 its /64
    network (one machine is commonly given a whole /64)."""
    location = address.split("://", 1)[-1]
    if location.startswith("["):  # [IPv6]:port
        host = location[1:].split("]", 1)[0]
    else:
        host = location.rsplit(":", 1)[0] if location.count(":") == 1 else location
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def host_groups(workers: dict[str, list[str]]) -> dict[str, int]:
    """Providers (with their workers' addresses) grouped by the hosts they share: two
    providers with a worker on one host are in one group, as are the providers joined to
    them that way; copies that must come from distinct hosts come from distinct groups.
    Returns provider -> its group's number."""
    group: dict[str, int] = {}
    owner_of_host: dict[str, str] = {}
    parent: dict[str, str] = {provider: provider for provider in workers}

    def root(provider: str) -> str:
        while parent[provider] != provider:
            parent[provider] = parent[parent[provider]]
            provider = parent[provider]
        return provider

    for provider, addresses in sorted(workers.items()):
        for host in {host_of(address) for address in addresses}:
            other = owner_of_host.setdefault(host, provider)
            parent[root(other)] = root(provider)
    roots = sorted({root(provider) for provider in workers})
    for provider in workers:
        group[provider] = roots.index(root(provider))
    return group
