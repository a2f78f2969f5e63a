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


# -- Two tiers: `pytest -m "not e2e"` is the unit tier; `make test` runs both ------------
#
# A test is end-to-end (marked `e2e`) when it starts real servers or processes: through
# one of the fixtures below (or a fixture that depends on one: pytest's closure of the
# fixtures a test uses is what is looked at), or by itself, as listed in E2E_TESTS. The
# rest is the unit tier. Starting a bare `python -c "import ..."` to see what an import
# pulls in, or failing to reach a port where nothing listens, does not make a test e2e.

E2E_FIXTURES = {
    # tests/conftest.py: the shared embedded network (a Dask scheduler and 2 worker
    # processes) and the IPython shell bound to it
    "net", "shell", "ip", "detached",
    # tests/credits/conftest.py: credit service processes, a PostgreSQL server
    "service", "fresh_service", "postgres_server",
    # module-local fixtures that start a network, a credit service or gpunet processes
    "own",            # test_metering.py: gpunet.connect(budget=...) - a LocalCluster
    "short_timeouts",  # test_metering.py: the same, with GPUNET_CREDITS_TIMEOUT set
    "market",         # test_providers.py: credit service + `gpunet scheduler/provide` processes
    "hostile",        # test_hostile_providers.py: the same, with a provider that attacks the notebook
    "liar_market",    # test_verification.py: gpunet.testing.local_market
    "package_site", "package_market", "held_index",  # test_packages.py: the registry, providers, a local index
    "honest_market",  # test_verification.py: gpunet.testing.local_market
    "departing_market", "liar_market_to_quarantine",  # test_departures.py: gpunet.testing.local_market
    "gateway_market",  # test_gateway.py: the open market with `gpunet gateway` in front
    "packaged_gateway",  # test_gateway_features.py: the same, one provider with a package, one that installs
    "priced_market", "judged_market", "one_host_market", "one_host_only",  # test_fairness.py: gpunet.testing.local_market
    "open_market",    # test_open_network.py: certificates, credit service, `gpunet scheduler/provide` over TLS
    "parts_ledger",   # credits/test_credits_parts.py: serve_in_background
    "ledger",         # credits/test_credits_tamper.py: serve_in_background
    "lab", "browser",  # test_browser.py: a JupyterLab server, Chromium (and the market beside them)
}

# Tests that start real processes in their own body (no fixture tells): a whole module,
# or one test of a module whose other tests are unit tests. Node ids, from the rootdir.
E2E_TESTS = [
    "tests/test_cli.py",        # `gpunet up/provide/...` as subprocesses (gpunet_processes)
    "tests/test_notebooks.py",  # notebooks run through nbclient and an ipykernel
    "tests/credits/test_credits_witness.py",  # credit services, `gpunet ledger` as subprocesses
    "tests/test_reproduce.py",  # the same, for `gpunet reproduce`
    "tests/test_sandbox_channel.py",  # sandbox processes of a SandboxPool
    # an embedded network with the defaults (gpunet.connect())
    "tests/test_metering.py::test_the_embedded_defaults_run_a_2000_item_trivial_map_in_one_go",
    # the README's blocks: an IPython shell that starts a network, `gpunet ...` processes
    "tests/test_readme.py::test_the_notebook_blocks_run_and_leave_nothing_behind",
    "tests/test_readme.py::test_a_market_in_five_commands",
    "tests/test_readme.py::test_the_registered_kernel_runs_gpunet",  # an ipykernel
    # scripts that start networks, a credit service whose parent is killed
    "tests/test_exits.py::test_a_script_without_a_main_guard_is_named_before_anything_starts",
    "tests/test_exits.py::test_a_script_that_exits_without_closing_is_quiet_and_leaves_no_process",
    "tests/test_exits.py::test_the_credit_service_stops_when_the_process_that_started_it_dies",
    # serve_in_background / `python -m gpunet.credits serve` (a credit service process):
    "tests/credits/test_credits_api.py::test_idempotent_calls_retry_across_a_restart_and_move_once",
    "tests/credits/test_credits_cli.py::test_serve_prints_url_and_token_file_and_creates_secrets",
    "tests/credits/test_credits_cli.py::test_rotating_the_operator_token",
    "tests/credits/test_credits_cli.py::test_gpunet_cli_has_the_verbs",
    "tests/credits/test_credits_cli.py::test_credit_verbs_wait_a_bounded_time_for_a_service_that_does_not_answer",
    "tests/credits/test_credits_concurrency.py::test_sigkill_loses_no_acknowledged_movement",
    "tests/credits/test_credits_memo.py::test_a_database_from_before_memos_opens_and_verifies",
    "tests/credits/test_credits_parts.py::test_a_partly_paid_hold_survives_a_restart",
    "tests/credits/test_credits_postgres.py::test_unreachable_postgres_is_a_clear_error",
    "tests/credits/test_credits_stale.py::test_open_holds_survive_a_restart_of_the_service",
    "tests/credits/test_credits_trust.py::test_records_survive_a_restart",
    # pip processes and a package index on 127.0.0.1, building a session environment
    "tests/test_packages.py::test_a_packages_pth_file_never_runs_outside_the_sandbox",
    "tests/test_packages.py::test_a_wheel_that_unpacks_far_past_the_cap_is_refused_before_it_is_installed",
    "tests/test_packages.py::test_an_environment_in_use_survives_another_sessions_flood_of_builds",
    # a credit service and `gpunet scheduler` processes:
    "tests/test_open_network_attacks.py::test_a_provider_cannot_blow_up_a_real_schedulers_memory",
]


def _check_e2e_tests(rootdir) -> None:
    """A renamed or moved test must not drop silently out of E2E_TESTS."""
    for entry in E2E_TESTS:
        path, _, name = entry.partition("::")
        source = rootdir / path
        if not source.is_file() or (name and f"def {name}(" not in source.read_text()):
            raise pytest.UsageError(f"tests/conftest.py E2E_TESTS names {entry}, which does not exist")


def pytest_collection_modifyitems(config, items):
    _check_e2e_tests(config.rootpath)
    for item in items:
        nodeid = item.nodeid.split("[")[0]
        module = nodeid.split("::")[0]
        if (E2E_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                or module in E2E_TESTS or nodeid in E2E_TESTS):
            item.add_marker(pytest.mark.e2e)
