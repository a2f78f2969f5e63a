"""The public surface stays small and honest: __all__ is exactly the public names."""

from __future__ import annotations

import __future__
import ast
import importlib
import inspect
import subprocess
import sys
import types

import pytest

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


# -- __all__ is exactly the public names, both ways (as httpx's test_exported_members) --
#
# The public names of a package: every attribute without a leading underscore, once the
# names it serves lazily (module __getattr__) are resolved, except submodules (they
# appear as attributes once imported) and `from __future__` features (compiler
# directives, not objects anyone imports). Names it serves lazily: those in __all__,
# those in its _LAZY table, and those imported under `if TYPE_CHECKING:`. __all__ is
# in sorted() order (upper case first), without duplicates.

PACKAGES = ["gpunet", "gpunet.credits"]


def _lazy_names(module: types.ModuleType) -> set[str]:
    names = set(getattr(module, "_LAZY", ()))
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.ImportFrom):
                    names.update(alias.asname or alias.name for alias in stmt.names)
    return names


def _public_names(module: types.ModuleType) -> set[str]:
    for name in sorted(_lazy_names(module) | set(module.__all__)):
        getattr(module, name)  # resolve it; one that does not resolve fails here, by name
    names = {name for name in vars(module) if not name.startswith("_")}
    names |= {name for name in _lazy_names(module) if not name.startswith("_")}
    return {
        name for name in names
        if not isinstance(getattr(module, name), (types.ModuleType, __future__._Feature))
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package):
    module = importlib.import_module(package)
    unresolved = []
    for name in module.__all__:
        try:
            getattr(module, name)
        except AttributeError:
            unresolved.append(name)
    assert unresolved == [], f"{package}.__all__ names what {package} does not have"
    assert module.__all__, f"{package}.__all__ is empty"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_all(package):
    module = importlib.import_module(package)
    public = _public_names(module)
    assert "__all__" not in public and public, f"found no public names in {package}"
    assert sorted(public - set(module.__all__)) == [], f"public in {package} but not in its __all__"
    assert sorted(set(module.__all__) - public) == [], f"in {package}.__all__ but not public"


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_without_duplicates(package):
    names = importlib.import_module(package).__all__
    assert isinstance(names, list)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert duplicates == [], f"{package}.__all__ names these twice"
    assert names == sorted(names), f"{package}.__all__ is not in sorted() order"
