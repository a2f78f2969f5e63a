"""Shared fixtures: one real embedded network (Dask scheduler + 2 worker processes on
127.0.0.1) and a real IPython shell with the extension loaded."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import gpunet
from gpunet.client import network as network_module


def pytest_configure(config):
    """Point gpunet's data dir at a temp dir for the whole run (the processes the
    tests start inherit it), so that no test writes into the user's data dir."""
    config.gpunet_data_dir = tempfile.mkdtemp(prefix="gpunet-tests-data-")
    os.environ["GPUNET_DATA_DIR"] = config.gpunet_data_dir


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "gpunet_data_dir", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def net():
    """The embedded network every notebook-side test shares."""
    network = gpunet.connect()
    yield network
    network.close()


@pytest.fixture(scope="session")
def shell(net):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "gpunet")
    return ip


@pytest.fixture
def ip(shell, net):
    """The IPython shell, with the shared network as gpunet.current()."""
    network_module._current = net
    for name in list(shell.user_ns):
        if not name.startswith("_") and name not in shell.user_ns_hidden:
            del shell.user_ns[name]
    yield shell
    network_module._current = net


@pytest.fixture
def detached(net):
    """For tests that connect networks of their own: no current network while the
    test runs (so connecting does not close the shared one), the shared one after."""
    network_module._current = None
    yield
    network_module._current = net
