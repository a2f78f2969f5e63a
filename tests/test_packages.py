"""The cell's packages on a stranger's GPU (gpunet.packages, gpunet.worker.environment).

The unit tier checks, from data, what a cell asks for and where it may run. The end-to-end
tests start a market with two providers as processes: ``has`` has a small pure-Python
package from the registry (tabulate, not in gpunet's install) on its workers' path, ``installs``
lacks it and runs ``gpunet provide --allow-installs``'s policy. The notebook (this test
process) has the package too, on its own path, so that the cell's import finds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from gpunet_processes import metered_network, stop

import gpunet
from gpunet import packages
from gpunet.errors import OptionError, PackageError
from gpunet.extensions.scheduler_plugin import checked_environment
from gpunet.ui.environment import SessionEnvironment
from gpunet.worker.environment import INSTALLS_ENV, InstallPolicy, canonical, unmet

PACKAGE, VERSION = "tabulate", "0.9.0"
#: a version of it the registry has only as a source distribution: no wheel for any platform
SDIST_ONLY = "0.8.2"
#: a wheel larger than the installing provider's cap (100 kB; humanize's is about 127 kB)
OVER_CAP = "humanize==4.9.0"


# -- unit tier: what a cell asks for -------------------------------------------------------------------


def test_imports_are_found_at_top_level_inside_functions_and_from_imports():
    code = "import numpy as np\nfrom pandas import DataFrame\nfrom . import mine\ndef f():\n    import jax.numpy\n"
    assert packages.modules_in_code(code) == ["numpy", "pandas", "jax"]


def test_the_notebook_versions_are_asked_for_and_stdlib_and_gpunet_are_not():
    import numpy

    environment = packages.for_code("import os, json, numpy, gpunet\nimport not_a_module_anywhere\n")
    assert environment.requirements == {"numpy": f"=={numpy.__version__}"}
    assert environment.sources == {"numpy": "import numpy"}


def test_pip_adds_and_overrides_and_a_bad_one_says_how_to_write_it():
    environment = packages.for_code("import numpy\n", ["numpy>=1", "tabulate==0.9.0"])
    assert environment.requirements == {"numpy": ">=1", "tabulate": "==0.9.0"}
    assert environment.sources["numpy"] == "--pip"
    for bad in ("tabulate===", "tabulate @ https://evil.example/x.whl", "tabulate[extra]==1"):
        with pytest.raises(OptionError, match="--pip"):
            packages.parse_pin(bad)


def test_a_bad_pip_for_a_gateway_is_refused_before_anything_connects():
    with pytest.raises(OptionError, match="only a name and versions"):
        gpunet.connect("https://127.0.0.1:1", token="t", pip=["tabulate @ https://evil.example/t.whl"], timeout=5)


def test_a_function_asks_for_its_module_and_the_modules_it_reads():
    import numpy as np

    def uses_numpy(n):
        return np.arange(n).sum()

    environment = packages.for_function(uses_numpy)
    assert environment.requirements == {"numpy": f"=={np.__version__}"}


def test_unmet_names_what_is_missing_and_what_is_there():
    assert unmet({"tabulate": "==0.9.0", "numpy": ">=1"}, {"numpy": "2.0"}) == {"tabulate": None}
    assert unmet({"tabulate": "==0.9.0"}, {"tabulate": "0.8.10"}) == {"tabulate": "0.8.10"}
    assert canonical("Foo_Bar.baz") == "foo-bar-baz"


# -- unit tier: where a cell may run ---------------------------------------------------------------------

REPORTS = {
    "tcp://a": {"provider": "alice", "packages": {"tabulate": "0.9.0"}, "installs": None, "gpu": False},
    "tcp://b": {"provider": "bob", "packages": {"tabulate": "0.8.10"}, "installs": None, "gpu": False},
    "tcp://c": {"provider": "carol", "packages": {}, "installs": {"max_bytes": 1, "max_seconds": 1.0,
                                                                  "builds": False}, "gpu": True},
}


def test_placement_prefers_the_providers_that_have_the_packages():
    environment = packages.CellEnvironment({"tabulate": "==0.9.0"})
    chosen = packages.place(environment, REPORTS, list(REPORTS))
    assert chosen.workers == ["tcp://a"] and chosen.installs == []


def test_placement_falls_back_to_providers_that_install():
    environment = packages.CellEnvironment({"tabulate": "==0.7.0"})
    chosen = packages.place(environment, REPORTS, list(REPORTS))
    assert chosen.workers == ["tcp://c"] and chosen.installs == ["tcp://c"]


def test_a_version_no_provider_has_is_refused_naming_the_package_the_versions_and_the_providers():
    environment = packages.CellEnvironment({"tabulate": "==0.7.0"}, {"tabulate": "import tabulate"})
    with pytest.raises(PackageError) as caught:
        packages.place(environment, REPORTS, ["tcp://a", "tcp://b"])
    message = str(caught.value)
    assert "tabulate==0.7.0 (import tabulate)" in message
    assert "0.8.10 on bob" in message and "0.9.0 on alice" in message
    assert "Nothing was sent" in message and "--allow-installs" in message


def test_a_gpu_build_goes_to_a_gpu_provider_or_is_refused():
    environment = packages.CellEnvironment({"tabulate": "==0.9.0"}, gpu_build=True,
                                           gpu_packages={"tabulate-cuda12": "the GPU build of tabulate"})
    assert packages.place(environment, REPORTS, list(REPORTS)).workers == ["tcp://c"]
    with pytest.raises(PackageError) as caught:
        packages.place(environment, REPORTS, ["tcp://a", "tcp://b"])
    assert "tabulate-cuda12 (the GPU build of tabulate), and no provider with a GPU can run it" in str(caught.value)
    assert "CPUs only (alice, bob)" in str(caught.value) and "Nothing was sent" in str(caught.value)


def test_a_pip_of_a_cuda_build_asks_for_a_gpu_and_a_cpu_one_does_not():
    for pin in ["jax[cuda12]==0.4.30", "jax-cuda12-plugin", "nvidia-cublas-cu12>=12", "torch==2.4.0+cu121",
                "cupy-cuda12x"]:
        environment = packages.resolve((), [pin])
        assert environment.gpu_build and environment.gpu_packages == {pin: "--pip"}, pin
    assert packages.resolve((), ["jax[cuda12]"]).requirements == {"jax": ""}  # the extra only asks for a GPU
    assert not packages.resolve((), ["jax==0.4.30", "tabulate", "pycuda-free-name"]).gpu_build


def test_workers_that_report_nothing_share_the_notebooks_environment():
    environment = packages.CellEnvironment({"tabulate": "==9"})
    assert packages.place(environment, None, ["tcp://x"]).workers is None
    assert packages.place(environment, {}, ["tcp://x"]).workers is None


def test_the_scheduler_keeps_only_a_well_formed_report():
    good = {"packages": {"tabulate": "0.9.0"}, "installs": None, "gpu": True, "python": "3.12", "extra": "x" * 10}
    assert checked_environment(good) == {"packages": {"tabulate": "0.9.0"}, "installs": None, "gpu": True,
                                         "python": "3.12", "platform": ""}
    assert checked_environment({"packages": {"a": 1}}) is None
    assert checked_environment({"packages": {}, "installs": {"max_bytes": "lots"}}) is None
    assert checked_environment({"packages": {f"p{i}": "1" for i in range(6000)}}) is None


def test_a_gpu_build_is_the_cuda_companion_of_a_package():
    installed = {"jax": "0.4.30", "jax-cuda12-plugin": "0.4.30", "jax-cuda12-pjrt": "0.4.30", "jaxlib": "0.4.30"}
    assert packages._gpu_companions("jax", installed) == ["jax-cuda12-pjrt", "jax-cuda12-plugin"]
    assert packages._gpu_companions("numpy", installed) == []


def test_provide_refuses_builds_without_installs_and_writes_the_policy(monkeypatch):
    import argparse

    from gpunet.cli.network import _install_policy

    monkeypatch.setenv(INSTALLS_ENV, "")  # restored (to unset) after the test: the policy is written here
    arguments = dict(allow_installs=False, allow_builds=True, install_max_mb=200.0, install_max_seconds=300.0)
    with pytest.raises(OptionError, match="--allow-builds only matters with --allow-installs"):
        _install_policy(argparse.Namespace(**arguments))
    with pytest.raises(OptionError, match="must be above 0"):
        _install_policy(argparse.Namespace(**{**arguments, "allow_installs": True, "install_max_mb": 0.0}))
    _install_policy(argparse.Namespace(**{**arguments, "allow_installs": True, "install_max_mb": 0.1}))
    assert InstallPolicy.from_env() == InstallPolicy(100_000, 300.0, True)


def test_the_install_policy_travels_to_the_workers_as_json(monkeypatch):
    monkeypatch.setenv(INSTALLS_ENV, InstallPolicy(1000, 5.0).to_env())
    assert InstallPolicy.from_env() == InstallPolicy(1000, 5.0, False)
    monkeypatch.delenv(INSTALLS_ENV)
    assert InstallPolicy.from_env() is None


# -- end to end: two providers as processes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def package_site(tmp_path_factory):
    """The package installed into a folder of its own, from the registry (skipped,
    saying why, where the registry cannot be reached)."""
    place = tmp_path_factory.mktemp("package-site")
    place.chmod(0o755)  # a root provider's sandboxes run as uids of their own: they read it as others do
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
                           "--target", str(place), f"{PACKAGE}=={VERSION}"], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        pytest.skip(f"cannot install {PACKAGE} from the registry here: {done.stderr.strip()[-300:]}")
    return place


@pytest.fixture(scope="module")
def package_market(package_site, tmp_path_factory):
    """`gpunet scheduler --private` with a credit service, and two `gpunet provide` processes:
    ``has`` with the package on its path, ``installs`` without it but with
    ``--allow-installs --install-max-mb 0.1`` (its own data dir: its wheel cache and
    session environments). The notebook (this process) has the package too."""
    place = tmp_path_factory.mktemp("package-market")
    data = place / "installs-data"
    with metered_network(place, ["has", "installs"], "scientist", credits=100_000,
                         args_of={"installs": ["--allow-installs", "--install-max-mb", "0.1"]},
                         env_of={"has": {"PYTHONPATH": str(package_site)},
                                 "installs": {"GPUNET_DATA_DIR": str(data)}}) as market:
        sys.path.insert(0, str(package_site))
        try:
            yield market, data
        finally:
            sys.path.remove(str(package_site))
            for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
                del sys.modules[name]


def _connect(market):
    return gpunet.connect(market["address"], credits=market["service"].url, token=market["tokens"]["scientist"],
                          budget=5_000)


def _workers_of(net, provider, timeout=60):
    """The addresses of ``provider``'s workers, once the scheduler has its report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [address for address, report in (net.environment_reports(fresh=True) or {}).items()
                 if report["provider"] == provider]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"provider {provider}'s workers never reported their environment")


def _ran(namespace, code, net, **options):
    return net.run_cell(code, namespace, quiet=True, timeout=180, **options)


def test_a_cuda_build_on_cpu_providers_is_refused_before_it_runs_and_a_cpu_one_runs(package_market, tmp_path,
                                                                                     detached):
    market, _ = package_market
    net = _connect(market)
    try:
        _workers_of(net, "installs")
        assert not any(report["gpu"] for report in net.environment_reports(fresh=True).values())  # CPUs only here
        marker = tmp_path / "ran"
        for pin, named in [("jax[cuda12]", "jax[cuda12] (--pip)"), ("jax-cuda12-plugin==0.4.30",
                                                                   "jax-cuda12-plugin==0.4.30 (--pip)")]:
            with pytest.raises(PackageError) as caught:
                _ran({"marker": str(marker)}, "open(marker, 'w').close()\n", net, pip=[pin])
            message = str(caught.value)
            assert f"asks for a GPU (CUDA) build: {named}, and no provider with a GPU can run it" in message
            assert "Nothing was sent" in message and "never runs on a CPU" in message
            assert not marker.exists() and not any(net.client.processing().values())
        namespace: dict = {}
        _ran(namespace, f"import {PACKAGE}\nversion = {PACKAGE}.__version__\n", net, pip=[f"{PACKAGE}=={VERSION}"])
        assert namespace["version"] == VERSION  # a CPU requirement runs on the same network
    finally:
        net.close()


def test_packages_place_install_reuse_and_refuse(package_market, package_site, tmp_path, detached, capsys):
    market, data = package_market
    net = _connect(market)
    try:
        has, installs = _workers_of(net, "has")[0], _workers_of(net, "installs")[0]
        reports = net.environment_reports(fresh=True)
        assert reports[has]["packages"][PACKAGE] == VERSION and PACKAGE not in reports[installs]["packages"]
        assert reports[installs]["installs"]["max_bytes"] == 100_000 and reports[has]["installs"] is None

        # 1. placed on the provider that has it
        namespace: dict = {}
        cell = _ran(namespace, f"import {PACKAGE}\nversion = {PACKAGE}.__version__\n", net)
        assert namespace["version"] == VERSION
        assert cell._results[0].worker == has
        assert cell._results[0].environment == {"kind": "base", "packages": {PACKAGE: VERSION}}
        record = cell.provenance
        assert record["environment"] == {"requirements": {PACKAGE: f"=={VERSION}"}}
        assert record["ran"][0]["environment"]["packages"] == {PACKAGE: VERSION}

        shown = repr(SessionEnvironment(net))
        assert f"asks for {PACKAGE}=={VERSION}" in shown
        assert f"{has}  has  has every package" in shown
        assert f"{installs}  installs  would install {PACKAGE}=={VERSION}" in shown

        # 2. a version with no wheel, and one over the provider's size cap: explained before
        #    anything of the cell runs
        with pytest.raises(PackageError, match="humanize 4.9.0 went over the provider's size cap of 97.7 KiB"):
            _ran({}, f"import {PACKAGE}\n", net, pip=[f"{OVER_CAP}"])
        marker = tmp_path / "ran"
        with pytest.raises(PackageError) as caught:
            _ran({"marker": str(marker)}, f"open(marker, 'w').close()\nimport {PACKAGE}\n", net,
                 pip=[f"{PACKAGE}=={SDIST_ONLY}"])
        message = str(caught.value)
        assert f"{PACKAGE}=={SDIST_ONLY}" in message and "binary wheels only" in message
        assert "Nothing of the job ran" in message and not marker.exists()

        # 2b. a provider whose installs change says so (its workers look every few seconds)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "--target", str(package_site), "humanize==4.8.0"], check=True, capture_output=True,
                       timeout=120)
        deadline = time.monotonic() + 60
        while (net.environment_reports(fresh=True) or {})[has]["packages"].get("humanize") != "4.8.0":
            assert time.monotonic() < deadline, "the provider never reported what was installed on it"
            time.sleep(0.2)

        # 3. the provider that has it leaves: the other installs it, once per session
        stop(market["providers"]["has"])  # Ctrl-C: it drains and leaves
        deadline = time.monotonic() + 60
        while has in (net.environment_reports(fresh=True) or {}):
            assert time.monotonic() < deadline, "the retired worker stayed in the scheduler's reports"
            time.sleep(0.1)
        started = time.monotonic()
        capsys.readouterr()
        first = net.run_cell(f"import {PACKAGE}\nwhere = {PACKAGE}.__file__\n", namespace, timeout=180)
        first_s = time.monotonic() - started
        assert f"gpunet: installing 1 package (0.0 MB) on {installs}" in capsys.readouterr().err
        environment = first._results[0].environment
        assert first._results[0].worker == installs and environment["kind"] == "session"
        assert environment["built_now"] is True and environment["installed"] == {PACKAGE: VERSION}
        assert list(environment["wheels"]) == [f"{PACKAGE}-{VERSION}-py3-none-any.whl"]
        assert str(data) in namespace["where"]  # imported from the session's environment
        started = time.monotonic()
        second = _ran(namespace, f"import {PACKAGE}\nagain = {PACKAGE}.__version__\n", net)
        second_s = time.monotonic() - started
        assert namespace["again"] == VERSION and second._results[0].environment["built_now"] is False
        assert second.provenance["ran"][0]["environment"]["wheels"] == environment["wheels"]
        # the session's sandbox sees its environment read-only: a cell cannot plant code in it
        _ran(namespace, f"import os, {PACKAGE}\ntry:\n    open(os.path.join(os.path.dirname({PACKAGE}.__file__), "
                        "'planted.py'), 'w').close()\n    planted = True\nexcept OSError:\n    planted = False\n", net)
        assert namespace["planted"] is False and not list(data.rglob("planted.py"))
        print(f"\nfirst cell (one install) {first_s:.2f} s, second cell (reused) {second_s:.2f} s")

    finally:
        net.close()


def test_a_version_no_provider_has_is_refused_before_it_is_sent(package_site, tmp_path, detached):
    with metered_network(tmp_path, ["has"], "scientist", env_of={"has": {"PYTHONPATH": str(package_site)}}) \
            as market:
        sys.path.insert(0, str(package_site))
        try:
            net = _connect(market)
            _workers_of(net, "has")
            try:
                marker = tmp_path / "ran"
                with pytest.raises(PackageError) as caught:
                    _ran({"marker": str(marker)}, f"open(marker, 'w').close()\nimport {PACKAGE}\n", net,
                         pip=[f"{PACKAGE}==0.8.10"])
                message = str(caught.value)
                assert f"{PACKAGE}==0.8.10 (--pip): providers have {VERSION} on has" in message
                assert "Nothing was sent" in message and not marker.exists()
                assert not any(net.client.processing().values())
            finally:
                net.close()
        finally:
            sys.path.remove(str(package_site))


# -- the embedded network: workers share the notebook's environment ---------------------------------------


def test_the_embedded_network_needs_nothing_and_env_says_so(ip):
    import numpy

    ip.run_cell_magic("gpunet", '--pip "numpy>=1" --quiet', "import numpy\nn = int(numpy.ones(3).sum())\n")
    assert ip.user_ns["n"] == 3
    shown = repr(ip.run_line_magic("gpunet", "env"))
    assert "numpy>=1" in shown and "share this notebook's" in shown
    assert "shares the notebook's environment" in shown  # every worker, one line each
    assert ip.user_ns["_gpunet"].provenance["flags"]["pip"] == ["numpy>=1"]
    assert "environment" not in ip.user_ns["_gpunet"].provenance  # nothing was asked of a worker
    del numpy


def test_a_bad_pip_is_a_usage_error_on_a_cell_and_on_connect(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="only a name and versions"):
        ip.run_cell_magic("gpunet", '--pip "tabulate @ https://evil.example/t.whl"', "x = 1\n")
    with pytest.raises(UsageError, match="is not a requirement"):
        ip.run_line_magic("gpunet", 'connect tcp://127.0.0.1:9 --pip "=="')


def test_reproduce_asks_for_the_recorded_packages_and_only_plain_requirements():
    import nbformat

    from gpunet.provenance import MIME_TYPE
    from gpunet.reproduce import recorded_requirements

    def cell(record):
        code = nbformat.v4.new_code_cell("%%gpunet\nimport tabulate\n")
        code.outputs = [nbformat.v4.new_output("display_data", data={MIME_TYPE: record, "text/plain": "gpunet"})]
        return code

    notebook = nbformat.v4.new_notebook(cells=[
        cell({"environment": {"requirements": {"tabulate": "==0.9.0", "evil": "==1; rm -rf /"}}}),
        cell({"environment": {"requirements": {"numpy": ">=1,<3", "--index-url": "==1"}}}),
        cell({"ran": []}),
    ])
    assert recorded_requirements(notebook) == {"tabulate": "==0.9.0", "numpy": ">=1,<3"}


def test_a_workers_requirements_are_names_and_versions_never_pip_options():
    from gpunet.worker.environment import checked_requirements, pip_lines

    assert pip_lines({"Tabulate": "==0.9.0", "numpy": ">=1,<3", "six": ""}) == [
        "numpy<3,>=1", "six", "tabulate==0.9.0"]
    for bad in ({"--index-url": "==1"}, {"-r": "/etc/shadow"}, {"x": "==1 --extra-index-url=http://evil"},
                {"../../x": ""}, {f"p{i}": "" for i in range(300)}, ["tabulate"]):
        with pytest.raises(PackageError):
            checked_requirements(bad)


def test_the_wheel_cache_stays_within_its_cap(tmp_path):
    import os

    from gpunet.worker.environment import WHEEL_CACHE_INSTALLS, SessionEnvironments

    environments = SessionEnvironments(tmp_path / "envs", tmp_path / "wheels", InstallPolicy(max_bytes=100))
    environments.wheels.mkdir()
    for number in range(WHEEL_CACHE_INSTALLS * 2):
        wheel = environments.wheels / f"p{number}-1-py3-none-any.whl"
        wheel.write_bytes(b"x" * 100)
        os.utime(wheel, (number, number))
    environments._prune_wheels()
    kept = sorted(int(path.name.split("-")[0][1:]) for path in environments.wheels.iterdir())
    assert kept == list(range(WHEEL_CACHE_INSTALLS, WHEEL_CACHE_INSTALLS * 2))  # the most recently used


def test_a_session_environment_is_layered_first_and_forgotten_after(tmp_path):
    from gpunet.worker.environment import PreparedEnvironment, layered

    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "gpunet_layered_probe.py").write_text("WHERE = 'session'\n")
    prepared = PreparedEnvironment(tmp_path, tmp_path / "bin" / "python", site, {}, {})
    with layered(prepared):
        import gpunet_layered_probe

        assert gpunet_layered_probe.WHERE == "session"
    assert "gpunet_layered_probe" not in sys.modules and str(site) not in sys.path
    (site / "json").mkdir()  # the worker process already holds the base's json
    with pytest.raises(PackageError, match="already imported from the provider's base"):
        with layered(prepared):
            pass


def test_a_providers_account_of_the_environment_is_checked_on_arrival():
    from gpunet.client.received import checked_result
    from gpunet.errors import ProviderDataError
    from gpunet.wire import JobResult, result_to_event

    fields = result_to_event(JobResult("job", None, "tcp://w", "cpu", 0.0, 1.0))
    fine = checked_result({**fields, "environment": {"kind": "base", "packages": {PACKAGE: "0.9.0\x1b[2J"}}}, "it")
    assert fine.environment == {"kind": "base", "packages": {PACKAGE: "0.9.0"}}  # escapes cleaned
    for bad in ({"packages": {PACKAGE: 1}}, {"kind": ["x"]}, "base", {str(i): i for i in range(40)}):
        with pytest.raises(ProviderDataError, match="environment"):
            checked_result({**fields, "environment": bad}, "it")


# -- stopping a job while its packages install ------------------------------------------------------------


class HeldIndex:
    """A package index on 127.0.0.1 (PEP 503 pages, the wheels of ``wheels`` beside them)
    that holds every answer for a project's page until :meth:`release`: an install from it
    takes as long as the test wants. ``asked`` counts the pages asked for; ``beacon`` is
    written when one is."""

    def __init__(self, wheels: Path, beacon: Path) -> None:
        self.wheels, self.beacon = wheels, beacon
        self.released = threading.Event()
        self.asked = 0
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = [part for part in self.path.split("/") if part]
                if len(parts) == 2 and parts[0] == "simple":
                    index.asked += 1
                    index.beacon.touch()
                    index.released.wait(300)
                    links = "".join(f'<a href="/files/{wheel.name}">{wheel.name}</a>'
                                    for wheel in sorted(index.wheels.glob(f"{parts[1].replace('-', '_')}-*.whl")))
                    self._answer(200, f"<html><body>{links}</body></html>".encode(), "text/html")
                elif len(parts) == 2 and parts[0] == "files" and (index.wheels / parts[1]).is_file():
                    self._answer(200, (index.wheels / parts[1]).read_bytes(), "application/octet-stream")
                else:
                    self._answer(404, b"not here", "text/plain")

            def _answer(self, status: int, body: bytes, kind: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the installer was killed while it waited
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def release(self) -> None:
        """Answer every page asked for, now and from now on."""
        self.released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held_index(tmp_path):
    """A :class:`HeldIndex` serving PACKAGE's wheel (downloaded from the registry: skipped,
    saying why, where it cannot be reached)."""
    wheels = tmp_path / "index-wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                           "-d", str(wheels), f"{PACKAGE}=={VERSION}"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"cannot download {PACKAGE} from the registry here: {done.stderr.strip()[-300:]}")
    index = HeldIndex(wheels, tmp_path / "index-asked")
    try:
        yield index
    finally:
        index.close()


def index_environment(index: HeldIndex, place: Path) -> dict[str, str]:
    """What points pip at ``index`` alone (no configuration file, no other folder of wheels)."""
    (place / "no-links").mkdir(exist_ok=True)
    return {"PIP_INDEX_URL": index.url, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(place / "no-links"),
            "PIP_NO_CACHE_DIR": "1"}


def processes_in(folder: Path) -> list[psutil.Process]:
    """The processes whose command line names a path under ``folder`` (an installer's)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(folder) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def wait_until(condition, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_stop_ends_an_install_at_once_and_leaves_nothing_half_built(held_index, tmp_path, monkeypatch):
    from gpunet.worker.environment import InstallStopped, SessionEnvironments

    for name, value in index_environment(held_index, tmp_path).items():
        monkeypatch.setenv(name, value)
    environments = SessionEnvironments(tmp_path / "envs", tmp_path / "wheels", InstallPolicy())
    stopped, outcome = threading.Event(), {}

    def build() -> None:
        try:
            outcome["prepared"] = environments.prepare("session", {PACKAGE: f"=={VERSION}"}, stopped=stopped)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome["error"] = exc

    builder = threading.Thread(target=build)
    builder.start()
    wait_until(lambda: held_index.asked, "the install never asked the index for the package", 120)
    assert processes_in(tmp_path / "envs"), "pip is not running while the index holds its answer"
    stopped.set()
    builder.join(30)
    assert not builder.is_alive(), "the install went on after its job was stopped"
    assert isinstance(outcome.get("error"), InstallStopped), outcome
    assert "stopped while resolving tabulate==0.9.0" in str(outcome["error"])
    wait_until(lambda: not processes_in(tmp_path / "envs"), "pip outlived the stop of its install")
    assert list((tmp_path / "envs").iterdir()) == []  # nothing half-built is kept
    held_index.release()  # the next try starts clean, and builds
    prepared = environments.prepare("session", {PACKAGE: f"=={VERSION}"})
    assert prepared.built_now and prepared.installed == {PACKAGE: VERSION}
    assert [path.name for path in (tmp_path / "envs").iterdir()] == [prepared.path.name]


def test_a_stop_during_an_install_on_a_provider_ends_it_and_the_session_then_switches_warm(
        held_index, package_site, tmp_path, detached, capsys):
    """Ctrl-C and a timeout while the provider's pip waits for the (held) index: the
    installer is killed, nothing half-built is kept, nothing is charged beyond the time
    used; the next cell installs clean, and cells that alternate between the session's
    environment and the provider's own switch warm sandboxes (no start)."""
    import math

    from gpunet.errors import CellTimeoutError
    from network_probes import ctrl_c_once_it_runs, wait_reported

    data = tmp_path / "installs-data"
    environments = data / "environments"
    provider_env = {"GPUNET_DATA_DIR": str(data), **index_environment(held_index, tmp_path)}
    with metered_network(tmp_path, ["installs"], "scientist", credits=100_000,
                         args_of={"installs": ["--allow-installs"]}, env_of={"installs": provider_env}) as market:
        sys.path.insert(0, str(package_site))
        net = _connect(market)
        try:
            _workers_of(net, "installs")
            stopped_s = []
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt), ctrl_c_once_it_runs(held_index.beacon, within=120):
                _ran({}, f"import {PACKAGE}\n", net)
            stopped_s.append(time.monotonic() - started)
            wait_until(lambda: not processes_in(environments), "the installer outlived the Ctrl-C")
            wait_until(lambda: not list(environments.glob("*/*")), "a half-built environment was kept")
            asked = held_index.asked
            started = time.monotonic()
            with pytest.raises(CellTimeoutError):
                net.run_cell(f"import {PACKAGE}\n", {}, quiet=True, timeout=20)
            stopped_s.append(time.monotonic() - started)
            assert held_index.asked > asked  # it was installing when its time ran out
            wait_until(lambda: not processes_in(environments), "the installer outlived the timeout")
            wait_until(lambda: not list(environments.glob("*/*")), "a half-built environment was kept")
            wait_reported(net)
            # nothing charged beyond the time used (a stopped attempt is not paid at all)
            assert market["operator"].balance("installs") <= sum(math.ceil(seconds) for seconds in stopped_s)

            held_index.release()
            capsys.readouterr()
            namespace: dict = {}
            first = net.run_cell(f"import {PACKAGE}\nversion = {PACKAGE}.__version__\n", namespace, timeout=180)
            assert "gpunet: installing 1 package" in capsys.readouterr().err
            assert namespace["version"] == VERSION and first._results[0].environment["built_now"] is True
            assert len(list(environments.glob("*/*"))) == 1

            count = "import builtins\nbuiltins.cells = getattr(builtins, 'cells', 0) + 1\nn = builtins.cells\n" \
                    "del builtins\n"
            cells = {"package": f"import {PACKAGE}\n" + count, "base": "import numpy\n" + count}
            seen, times = [], []
            for which in ["package", "base", "package", "base", "package", "base"]:
                namespace = {}
                began = time.monotonic()
                _ran(namespace, cells[which], net)
                times.append(time.monotonic() - began)
                seen.append(namespace["n"])
            # each environment's sandbox counts on: neither is started again
            assert seen == [1, 1, 2, 2, 3, 3], seen
            print(f"\nCtrl-C during the install ended its cell {stopped_s[0]:.2f} s after it was sent; cells "
                  f"alternating between two environments: {sum(times[1:]) / len(times[1:]):.2f} s per cell")
        finally:
            net.close()
            sys.path.remove(str(package_site))
            for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
                del sys.modules[name]


# -- a client's package runs nothing on its provider outside the sandbox -----------------------------


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel of ``files`` (its path -> text), as anyone may publish one."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in {**files, f"{info}/RECORD": "\n".join(record) + "\n"}.items():
            archive.writestr(path, text)
    return wheel


def test_a_packages_pth_file_never_runs_outside_the_sandbox(tmp_path, monkeypatch):
    """A wheel may carry a ``.pth`` file, whose ``import`` lines every Python that starts on
    that site-packages runs. The provider builds the session's environment outside the
    sandbox: nothing of the client's package may run there (with the worker's files and
    environment); it runs only in the session's sandbox, as the client's cells do."""
    from gpunet.worker.environment import SessionEnvironments

    marker = tmp_path / "ran-on-the-provider"
    _wheel(tmp_path / "index-wheels", "sneaky_pth", "1.0", {
        "sneaky_pth/__init__.py": "",
        "sneaky_pth.pth": f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"})
    index = HeldIndex(tmp_path / "index-wheels", tmp_path / "index-asked")
    index.release()
    try:
        for name, value in index_environment(index, tmp_path).items():
            monkeypatch.setenv(name, value)
        environments = SessionEnvironments(tmp_path / "envs", tmp_path / "wheels", InstallPolicy())
        prepared = environments.prepare("session", {"sneaky-pth": "==1.0"})
    finally:
        index.close()
    assert prepared.installed == {"sneaky-pth": "1.0"} and (prepared.site_packages / "sneaky_pth.pth").is_file()
    assert not marker.exists(), "the package's .pth file ran on the provider, outside the sandbox"


def test_a_wheel_that_unpacks_far_past_the_cap_is_refused_before_it_is_installed(tmp_path, monkeypatch):
    """The size cap counts what is downloaded; a wheel is a zip, and a few kilobytes of it
    may unpack to gigabytes on the provider's disk (eight kept environments of them). What
    the wheels unpack to is capped too, read from their own listing before pip runs."""
    from gpunet.worker.environment import UNPACKED_PER_DOWNLOADED, SessionEnvironments

    policy = InstallPolicy(max_bytes=1024 * 1024)
    _wheel(tmp_path / "index-wheels", "roomy", "1.0", {"roomy/__init__.py": "",
                                                       "roomy/zeros.txt": "0" * (UNPACKED_PER_DOWNLOADED * 2 << 20)})
    assert (tmp_path / "index-wheels" / "roomy-1.0-py3-none-any.whl").stat().st_size < policy.max_bytes
    index = HeldIndex(tmp_path / "index-wheels", tmp_path / "index-asked")
    index.release()
    try:
        for name, value in index_environment(index, tmp_path).items():
            monkeypatch.setenv(name, value)
        environments = SessionEnvironments(tmp_path / "envs", tmp_path / "wheels", policy)
        with pytest.raises(PackageError, match=r"roomy-1.0-py3-none-any.whl unpacks to 20.0 MiB in 5 files, over the .* cap"):
            environments.prepare("session", {"roomy": "==1.0"})
    finally:
        index.close()
    assert list((tmp_path / "envs").iterdir()) == []  # nothing of it was installed


def test_a_download_is_cached_under_a_plain_file_name_never_a_path():
    from gpunet.worker.environment import download_file_name

    entry = {"name": "tabulate", "version": "0.9.0"}
    url = "https://files.example/packages/ab/tabulate-0.9.0-py3-none-any.whl"
    assert download_file_name({**entry, "url": url}) == "tabulate-0.9.0-py3-none-any.whl"
    assert download_file_name({**entry, "url": "https://files.example/tabulate-0.9.0.tar.gz"}) == "tabulate-0.9.0.tar.gz"
    for hostile in ("https://files.example/..%2F..%2Fetc%2Fcron.d%2Fx.whl", "https://files.example/%2Ftmp%2Fx.whl",
                    "https://files.example/..", "https://files.example/", "https://files.example/tabulate.sh"):
        with pytest.raises(PackageError, match="no file to download"):
            download_file_name({**entry, "url": hostile})


def test_one_session_removes_its_own_environments_before_anyone_elses_and_never_one_in_use():
    from gpunet.worker.environment import evictions

    def keys(session: str, count: int) -> list[str]:
        return [f"{session * 12}{number:024d}" for number in range(count)]

    victim, attacker = keys("v", 1), keys("a", 9)
    # the attacker's ninth build on a worker of 8: its own oldest goes, never the victim's
    assert evictions(victim + attacker[:8], set(), per_session=8) == [attacker[0]]
    # over its own cap of 4, the attacker loses its oldest first, even where the victim's is older
    assert evictions(victim + attacker[:5], set()) == [attacker[0]]
    # two sessions of 4 and a newcomer: the worker is full, the larger session's oldest goes
    other = keys("o", 4)
    assert evictions(other + attacker[:4] + keys("n", 1), set()) == [other[0]]
    # an environment a job runs with is never removed, whoever keeps the most
    assert evictions(victim + attacker[:5], {attacker[0]}) == [attacker[1]]
    # all that could go are in use: the worker keeps more for a while
    assert evictions(keys("x", 5), set(keys("x", 5)), per_session=4) == []
    # among sessions that keep as many, the least recently used goes
    assert evictions(keys("p", 1) + keys("q", 1) + keys("r", 1), set(), kept=2) == [keys("p", 1)[0]]


def test_an_environment_in_use_survives_another_sessions_flood_of_builds(tmp_path):
    """Real builds (venv, pip): a worker that keeps 2 environments, 1 per session; the victim's
    job runs with its environment while another session builds one after another."""
    from gpunet.worker.environment import SessionEnvironments

    base = {"msgpack": ">=0"}  # met by the provider's base: nothing to download
    environments = SessionEnvironments(tmp_path / "envs", tmp_path / "wheels", InstallPolicy(), kept=2,
                                       per_session=1)
    victims = environments.prepare("victim", base)
    floods = [environments.prepare(f"flood-{number}", base) for number in range(3)]
    for flood in floods:
        environments.done_with(flood)
    assert victims.python.exists()  # in use: never removed
    assert sum(flood.python.exists() for flood in floods) == 1  # the flood's last one; the worker keeps 2
    environments.done_with(victims)
    assert victims.python.exists()  # no longer in use, but within the worker's 2
    again = environments.prepare("victim", base)
    assert again is victims and not again.built_now
    environments.done_with(again)
    environments.close()


def test_a_session_that_installs_again_and_again_waits_behind_a_newcomer():
    from gpunet.worker.environment import next_install

    waiting = [(1, "flood"), (2, "flood"), (3, "newcomer"), (4, "other")]
    assert next_install(waiting, {"flood": 5}) == (3, "newcomer")  # none installed yet: the earliest of those
    assert next_install(waiting, {"flood": 1, "newcomer": 1, "other": 1}) == (1, "flood")  # equals: first come
    assert next_install([], {}) is None
