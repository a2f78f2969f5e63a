"""The packages a cell needs, found in the notebook, and where on the network they are met.

Nothing to declare for the common case: a cell's imports (top level and inside its
functions, found with ``ast``) and, for ``net.run`` / ``net.map``, the function's module
and imports are mapped to distributions (``importlib.metadata.packages_distributions``)
and resolved to the exact versions installed in the notebook's own environment. The
standard library, gpunet itself and modules no installed distribution provides (the
notebook's own files, editable installs) are left out. ``--pip "pkg==1.2"`` (repeatable, on a cell or on
``%gpunet connect`` / ``gpunet.connect(pip=...)``) adds a requirement or overrides one.

A notebook built with a GPU build of a package (``jax[cuda12]``: the
``jax-cuda12-plugin`` beside ``jax``; a ``+cu121`` version), or whose ``--pip`` asks for
one (``jax[cuda12]``, a CUDA-only distribution such as ``jax-cuda12-plugin`` or
``nvidia-cublas-cu12``), asks for a provider with a GPU: such a cell is placed on a GPU
provider or refused before anything is sent, naming the package, never run on a CPU.

:func:`place` decides, from what providers report (:func:`gpunet.worker.environment.
environment_report`, through the scheduler), which workers may run a cell: those whose
environment satisfies it; else those that allow installs (the cell then runs after
one); else none, and :class:`~gpunet.errors.PackageError` says which package, which
versions the providers have, and which providers could run it. Workers that report
nothing (the embedded network's, a private network's plain Dask workers) share the
notebook's environment and satisfy every cell.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from gpunet.errors import OptionError, PackageError
from gpunet.worker.environment import canonical, requirements_digest, unmet

#: Distributions never asked for: gpunet itself (every worker runs it) and the tools of an environment.
NEVER_ASKED = frozenset({"gpunet", "pip", "setuptools", "wheel"})
#: A distribution that exists only as a CUDA build: ``jax-cuda12-plugin``, ``cupy-cuda12x``,
#: ``nvidia-cublas-cu12``, ``torch-cu121``.
CUDA_ONLY_NAME = re.compile(r"(^|-)(cuda\d*x?|cu\d+x?)(-|$)|^nvidia-")
#: An extra that asks for a package's CUDA build: ``jax[cuda12]``, ``jax[cuda12_pip]``, ``x[gpu]``.
CUDA_EXTRA = re.compile(r"^(cuda\d*|cu\d+|gpu)([-_.].*)?$")


@dataclass(frozen=True)
class CellEnvironment:
    """What a cell asks of a worker's environment."""

    #: {canonical distribution name: specifier}, e.g. {"tinycss2": "==1.4.0"}
    requirements: dict[str, str] = field(default_factory=dict)
    #: where each requirement came from: "import X" (found in the code) or "--pip"
    sources: dict[str, str] = field(default_factory=dict)
    #: a GPU build of a package is asked for: only workers with a GPU may run it
    gpu_build: bool = False
    #: which: {"jax[cuda12]": "--pip", "jax-cuda12-plugin": "the GPU build of jax"}
    gpu_packages: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """The SHA-256 of the requirements (a worker builds one environment per session and digest)."""
        return requirements_digest(self.requirements)

    def describe(self) -> dict[str, Any]:
        """The environment as a provenance record keeps it."""
        return {"requirements": dict(sorted(self.requirements.items())), "gpu_build": self.gpu_build,
                "digest": self.digest}


# -- finding what a cell imports ---------------------------------------------------------------------


def modules_in_code(code: str) -> list[str]:
    """The top-level modules ``code`` imports anywhere (functions included); relative imports left out."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    found: list[str] = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top not in found:
                found.append(top)
    return found


def modules_of_function(fn: Callable[..., Any]) -> list[str]:
    """The modules a function sent with ``net.run`` / ``net.map`` needs: its own module
    (unless it is the notebook's ``__main__``), the modules its source imports, and the
    modules it reads as globals."""
    found: list[str] = []
    target = getattr(fn, "__wrapped__", fn)
    module = getattr(target, "__module__", None) or ""
    if module and module != "__main__":
        found.append(module.split(".")[0])
    try:
        found += modules_in_code(textwrap.dedent(inspect.getsource(target)))
    except (OSError, TypeError):
        pass
    code = getattr(target, "__code__", None)
    read: dict[str, Any] = {name: getattr(target, "__globals__", {}).get(name)
                            for name in (code.co_names if code is not None else ())}
    for name, cell in zip(code.co_freevars if code is not None else (), getattr(target, "__closure__", None) or ()):
        try:
            read[name] = cell.cell_contents
        except ValueError:  # a closure cell not yet filled
            continue
    for value in read.values():
        if isinstance(value, types.ModuleType):
            found.append(value.__name__.split(".")[0])
        elif value is not None and getattr(value, "__module__", None) and not isinstance(value, (int, float, str)):
            found.append(str(value.__module__).split(".")[0])
    return list(dict.fromkeys(found))


# -- resolving modules to distributions ---------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _notebook_distributions(path_key: tuple[str, ...]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(module -> distributions, {canonical name: version}) of this environment, for one ``sys.path``."""
    from gpunet.worker.environment import installed_distributions

    return metadata.packages_distributions(), installed_distributions(list(path_key))


def notebook_distributions() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution of the notebook's environment."""
    return _notebook_distributions(tuple(sys.path))[1]


def resolve(modules: Iterable[str], pins: Iterable[str] = ()) -> CellEnvironment:
    """The environment ``modules`` need, at the versions installed here, with ``pins``
    (``"pkg==1.2"``, ``"pkg>=2"``, ``"pkg"``) added or overriding."""
    by_module, installed = _notebook_distributions(tuple(sys.path))
    requirements: dict[str, str] = {}
    sources: dict[str, str] = {}
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    for module in modules:
        if module in stdlib or module in sys.builtin_module_names or not _installed_module(module):
            continue
        for distribution in by_module.get(module, ()):
            name = canonical(distribution)
            if name in NEVER_ASKED or name not in installed:
                continue
            requirements.setdefault(name, f"=={installed[name]}")
            sources.setdefault(name, f"import {module}")
    gpu_packages: dict[str, str] = {}
    for name in list(requirements):
        for companion in _gpu_companions(name, installed):
            requirements.setdefault(companion, f"=={installed[companion]}")
            sources.setdefault(companion, f"the GPU build of {name}")
            gpu_packages[companion] = sources[companion]
        if "+cu" in installed.get(name, ""):  # e.g. torch 2.4.0+cu121
            gpu_packages[f"{name} {installed[name]}"] = sources[name]
    for pin in pins:
        name, specifier, cuda_extras = _parsed_pin(pin)
        requirements[name] = specifier
        sources[name] = "--pip"
        gpu_packages.pop(name, None)  # what the pin says replaces what the imports found
        if cuda_extras or CUDA_ONLY_NAME.search(name) or "+cu" in specifier:
            extras = f"[{','.join(cuda_extras)}]" if cuda_extras else ""
            gpu_packages[f"{name}{extras}{specifier}"] = "--pip"
    return CellEnvironment(requirements, sources, bool(gpu_packages), gpu_packages)


def _installed_module(name: str) -> bool:
    """Whether module ``name`` (where this notebook has imported it) comes from an installed
    distribution, not from the notebook's own files or an editable install, whose name a
    distribution on the registry may share (``tests``, ``utils``)."""
    module = sys.modules.get(name)
    where = getattr(module, "__file__", None) if module is not None else None
    return where is None or "site-packages" in where or "dist-packages" in where


def _gpu_companions(name: str, installed: dict[str, str]) -> list[str]:
    """The CUDA builds installed beside ``name``: ``jax`` -> ``jax-cuda12-plugin``, ``jax-cuda12-pjrt``."""
    return sorted(other for other in installed if other.startswith(f"{name}-cuda") and other != name)


def parse_pin(text: str) -> tuple[str, str]:
    """``"Pkg==1.2"`` -> ("pkg", "==1.2"); :class:`OptionError` for anything else
    (URLs, markers and extras are not what a provider installs from; a CUDA extra,
    ``jax[cuda12]``, only asks for a provider with a GPU)."""
    name, specifier, _ = _parsed_pin(text)
    return name, specifier


def _parsed_pin(text: str) -> tuple[str, str, list[str]]:
    """(name, specifier, its CUDA extras) of a ``--pip`` requirement."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(text.strip())
    except InvalidRequirement as exc:
        raise OptionError(f"--pip {text!r} is not a requirement ({exc}); write it like --pip \"tinycss2==1.4.0\"") \
            from None
    other_extras = [extra for extra in requirement.extras if not CUDA_EXTRA.match(extra)]
    if requirement.url or requirement.marker or other_extras:
        raise OptionError(f"--pip {text!r}: only a name and versions, like --pip \"tinycss2==1.4.0\" (no URL, "
                          "markers or extras other than a CUDA build's, like jax[cuda12])")
    return canonical(requirement.name), str(requirement.specifier), sorted(requirement.extras)


def for_code(code: str, pins: Iterable[str] = ()) -> CellEnvironment:
    """The environment a cell's ``code`` needs."""
    return resolve(modules_in_code(code), pins)


def for_function(fn: Callable[..., Any], pins: Iterable[str] = ()) -> CellEnvironment:
    """The environment a function sent with ``net.run`` / ``net.map`` needs."""
    return resolve(modules_of_function(fn), pins)


# -- placing a cell where its environment is met -------------------------------------------------------


@dataclass
class Placement:
    """Where a cell may run: ``workers`` (None: anywhere) and whether those workers will
    install packages first (``installs``: the workers that will)."""

    workers: list[str] | None
    installs: list[str] = field(default_factory=list)
    #: worker -> how its environment meets the cell ("has them", "installs ...", "shares the notebook's")
    where: dict[str, str] = field(default_factory=dict)


def place(environment: CellEnvironment, reports: dict[str, dict[str, Any]] | None,
          candidates: Iterable[str]) -> Placement:
    """Which of ``candidates`` (worker addresses that fit the cell's resources) may run a
    cell needing ``environment``, given the providers' ``reports`` (address -> report
    with ``provider``); :class:`PackageError` when none may."""
    candidates = list(candidates)
    reports = reports or {}
    if not reports or not environment.requirements:
        return Placement(None, where={address: "shares the notebook's environment" for address in candidates})
    if environment.gpu_build and candidates and not any(
            address not in reports or reports[address].get("gpu") for address in candidates):
        raise PackageError(gpu_refusal(environment, reports, candidates))
    satisfied, installing, where = [], [], {}
    for address in candidates:
        report = reports.get(address)
        if report is None:  # a worker that says nothing shares the notebook's environment
            satisfied.append(address)
            where[address] = "shares the notebook's environment"
            continue
        if environment.gpu_build and not report.get("gpu"):
            where[address] = "no GPU for the GPU build"
            continue
        missing = unmet(environment.requirements, report.get("packages") or {})
        if not missing:
            satisfied.append(address)
            where[address] = "has them"
        elif report.get("installs"):
            installing.append(address)
            where[address] = "installs " + ", ".join(f"{name}{environment.requirements[name]}" for name in missing)
        else:
            where[address] = "lacks " + ", ".join(_have(name, environment.requirements[name], have)
                                                  for name, have in missing.items())
    if satisfied:
        return Placement(satisfied, where=where)
    if installing:
        return Placement(installing, installs=installing, where=where)
    raise PackageError(refusal(environment, reports, candidates))


def _have(name: str, wanted: str, have: str | None) -> str:
    return f"{name}{wanted} (has {have})" if have else f"{name}{wanted} (not installed)"


def refusal(environment: CellEnvironment, reports: dict[str, dict[str, Any]], candidates: list[str]) -> str:
    """Why no provider can run a cell: per package, the versions asked and those the
    providers have; which providers come closest; what to do."""
    lines = ["no provider can run this cell with the packages it needs, and none allows installs:"]
    for name, wanted in sorted(environment.requirements.items()):
        offered: dict[str, list[str]] = {}
        for address in candidates:
            report = reports.get(address) or {}
            have = (report.get("packages") or {}).get(name)
            offered.setdefault(have or "not installed", []).append(str(report.get("provider") or address))
        if set(offered) == {wanted.removeprefix("==")}:
            continue
        having = "; ".join(f"{version} on {', '.join(sorted(set(who)))}" for version, who in sorted(offered.items()))
        lines.append(f"  {name}{wanted} ({environment.sources.get(name, 'asked')}): providers have {having}")
    if environment.gpu_build:
        gpus = sorted({str((reports.get(a) or {}).get("provider") or a) for a in candidates
                       if (reports.get(a) or {}).get("gpu")})
        lines.append(f"  a GPU build is asked for: providers with a GPU: {', '.join(gpus) or 'none'}")
    best = min(candidates, key=lambda a: len(unmet(environment.requirements, (reports.get(a) or {}).get("packages")
                                                   or {})), default=None)
    if best is not None:
        lines.append(f"  closest: {(reports.get(best) or {}).get('provider') or best} ({best})")
    lines.append("Nothing was sent. Ask for a version a provider has (--pip \"name==version\"), install the "
                 "same version in this notebook, or use a network whose providers allow installs "
                 "(gpunet provide --allow-installs).")
    return "\n".join(lines)


def gpu_refusal(environment: CellEnvironment, reports: dict[str, dict[str, Any]], candidates: list[str]) -> str:
    """Why a cell that asks for a GPU build cannot run on a network whose providers offer
    CPUs only: which packages are GPU builds, and what to do."""
    asked = ", ".join(f"{name} ({source})" for name, source in sorted(environment.gpu_packages.items())) \
        or "a GPU build"
    providers = ", ".join(sorted({str((reports.get(address) or {}).get("provider") or address)
                                  for address in candidates}))
    return (f"this cell asks for a GPU (CUDA) build: {asked}, and no provider with a GPU can run it: the "
            f"providers here offer CPUs only ({providers}). Nothing was sent: a GPU build never runs on a CPU "
            "instead. Use a network whose providers have GPUs, or ask for the CPU build (--pip \"jax\" rather "
            "than \"jax[cuda12]\"; a notebook environment without the CUDA plugin).")


def describe_where(environment: CellEnvironment, reports: dict[str, dict[str, Any]] | None,
                   workers: Iterable[str]) -> list[tuple[str, str, str]]:
    """(worker, provider, how it meets ``environment``) for each worker: what ``%gpunet env`` shows."""
    rows = []
    for address in sorted(workers):
        report = (reports or {}).get(address)
        if report is None:
            rows.append((address, "-", "shares the notebook's environment"))
            continue
        missing = unmet(environment.requirements, report.get("packages") or {})
        if environment.gpu_build and not report.get("gpu"):
            how = "cannot: no GPU for the GPU build"
        elif not missing:
            how = "has every package"
        elif report.get("installs"):
            how = "would install " + ", ".join(f"{name}{environment.requirements[name]}" for name in missing)
        else:
            how = "cannot: lacks " + ", ".join(_have(name, environment.requirements[name], have)
                                               for name, have in missing.items())
        rows.append((address, str(report.get("provider") or "-"), how))
    return rows
