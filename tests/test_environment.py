"""environment.yml (for conda users) and pyproject.toml stay in step.

The rule: every requirement in pyproject.toml's ``[project].dependencies`` appears in
environment.yml by its own name, either as a conda package or as a requirement line
of its ``pip:`` list. Being pulled in by ``pip install -e .`` (gpunet's own
dependencies) does NOT count: that would let conda users get silently a pip-built copy
of what conda-forge has. A requirement with extras names each distribution they stand
for (``dask[distributed]`` -> ``dask`` and ``distributed``, see ``EXTRAS``). Where the
environment gives a version bound, it is the one of pyproject.toml; its python bound
is ``requires-python``; and gpunet itself is installed by pip, editable, from this
checkout.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / "environment.yml"

# A requirement with extras -> the conda-forge packages that together give it.
EXTRAS = {"dask[distributed]": {"dask", "distributed"}}

# A conda match spec as written in environment.yml: a name, then a version spec.
_CONDA_SPEC = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<spec>[^\s#]*)\s*$")


@pytest.fixture(scope="module")
def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


@pytest.fixture(scope="module")
def env() -> dict:
    return yaml.safe_load(ENV_FILE.read_text())


def _conda(env: dict) -> dict[str, SpecifierSet]:
    """The conda packages of the environment, normalized name -> version spec."""
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            m = _CONDA_SPEC.match(dep)
            assert m, f"cannot read conda spec {dep!r}"
            out[canonicalize_name(m["name"])] = SpecifierSet(m["spec"])
    return out


def _pip_lines(env: dict) -> list[str]:
    lists = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(lists) <= 1, "one pip: list, please"
    return lists[0] if lists else []


def _pip_requirements(env: dict) -> dict[str, SpecifierSet]:
    """The pip requirement lines (not options such as -e), normalized name -> spec."""
    out = {}
    for line in _pip_lines(env):
        if not line.startswith("-"):
            req = Requirement(line)
            out[canonicalize_name(req.name)] = req.specifier
    return out


def _lower_bound(spec: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in spec if s.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def test_the_file_says_how_to_use_it():
    head = ENV_FILE.read_text().split("\nname:")[0]
    assert "conda env create -f environment.yml" in head
    assert "conda activate gpunet" in head


def test_name_and_channel(env):
    assert env["name"] == "gpunet"
    assert env["channels"] == ["conda-forge"]
    assert "pip" in _conda(env), "the pip: list needs pip itself from conda"


def test_every_dependency_of_pyproject_is_named(project, env):
    named = {**_conda(env), **_pip_requirements(env)}
    missing, wrong_bound = [], []
    for line in project["dependencies"]:
        req = Requirement(line)
        key = canonicalize_name(req.name) + (f"[{','.join(sorted(req.extras))}]" if req.extras else "")
        if req.extras:
            assert key in EXTRAS, f"{line!r}: say in EXTRAS which conda-forge packages give {key}"
        for name in sorted(EXTRAS.get(key, {canonicalize_name(req.name)})):
            if name not in named:
                missing.append(f"{name} (for {line!r})")
            elif str(named[name]) and named[name] != req.specifier:
                wrong_bound.append(f"{name}{named[name]} but pyproject.toml has {line!r}")
    assert missing == [], "environment.yml lacks these dependencies of pyproject.toml"
    assert wrong_bound == [], "environment.yml and pyproject.toml disagree on these bounds"


def test_python_bound_is_requires_python(project, env):
    conda = _conda(env)
    assert "python" in conda, "environment.yml must name python"
    requires = SpecifierSet(project["requires-python"])
    assert _lower_bound(conda["python"]) is not None, "give python a lower bound"
    assert _lower_bound(conda["python"]) == _lower_bound(requires), (conda["python"], requires)
    assert requires.contains(str(_lower_bound(conda["python"]))), "the bound itself must be allowed"


def test_gpunet_itself_is_pip_installed_from_the_checkout(env):
    assert "gpunet" not in _conda(env), "gpunet is not on conda-forge: install it with pip"
    editable = []
    for line in _pip_lines(env):
        m = re.fullmatch(r"""-e\s+(['"]?)(?P<path>[^\[\s'"]+)(?P<extras>\[[^\]]*\])?\1""", line.strip())
        if m:
            editable.append(m)
    assert len(editable) == 1, f"expected one `-e .` line in the pip: list, got {_pip_lines(env)}"
    # conda runs pip from the directory of environment.yml
    target = (ENV_FILE.parent / editable[0]["path"]).resolve()
    assert target == ROOT
    with open(target / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["name"] == "gpunet"
    extras = editable[0]["extras"]
    if extras:
        with open(target / "pyproject.toml", "rb") as f:
            known = set(tomllib.load(f)["project"]["optional-dependencies"])
        assert set(extras.strip("[]").split(",")) <= known, extras


def test_every_package_folder_is_installed():
    """A non-editable install (a wheel, conda's pip line without -e) carries exactly the
    packages pyproject.toml lists: every folder of gpunet with an __init__.py is one."""
    mapped = {"gpunet.kernels": ROOT / "kernels", "gpunet.extensions": ROOT / "extensions"}
    folders = {".".join(("gpunet", *path.parent.relative_to(ROOT / "gpunet").parts))
               for path in (ROOT / "gpunet").rglob("__init__.py")}
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    assert folders | set(mapped) == listed
    assert all((folder / "__init__.py").exists() for folder in mapped.values())
