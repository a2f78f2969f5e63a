"""What a notebook has on a direct network, through an open network's gateway, every
party its own process on 127.0.0.1: ``%gpunet usage`` and ``%gpunet receipt`` (the
notebook's own session only: another account asking for it gets 404/403), reuse of
verified results (the same account's only), and the cell's packages (its imports at the
notebook's versions, ``--pip``) sent as data, placing the cell on the provider that has
them, or on the one that installs them (``gpunet provide --allow-installs``); ``%gpunet
env`` shows what is sent and where it is met."""

from __future__ import annotations

import sys
import time

import pytest
import requests

import gpunet
from gpunet.client.gateway_link import pack, unpack
from gpunet.credits import ForbiddenError, verify_service
from gpunet.errors import GatewayError, PackageError
from gpunet.ui.environment import SessionEnvironment
from gpunet.ui.receipt import SessionReceipt
from gpunet.ui.usage import SessionUsage
from gpunet_processes import stop
from test_gateway import gateway_in_front
from test_open_network import open_network_of_processes
from test_packages import PACKAGE, VERSION, _workers_of, package_site  # noqa: F401 - the fixture

WAIT_S = 60.0


@pytest.fixture(scope="module")
def packaged_gateway(package_site, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """The open market (alice, bob) with `gpunet gateway` in front: alice has the package on
    her workers' path; bob lacks it and allows installs (100 kB at most, his own data dir).
    A second client account, dave, is there to try carol's session. The notebook (this
    process) has the package too."""
    place = tmp_path_factory.mktemp("gateway-features")
    with open_network_of_processes(place, env_of={"alice": {"PYTHONPATH": str(package_site)},
                                                  "bob": {"GPUNET_DATA_DIR": str(place / "bob-data")}},
                                   args_of={"bob": ["--allow-installs", "--install-max-mb", "0.1"]}) as market:
        with market["service"].client() as operator:
            market["tokens"]["dave"] = operator.create_account("dave", "client")["token"]
            operator.mint("dave", 100_000, key="mint-dave")
        with gateway_in_front(market) as fronted:
            sys.path.insert(0, str(package_site))
            try:
                yield fronted
            finally:
                sys.path.remove(str(package_site))
                for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
                    del sys.modules[name]


def _connect(market, who="carol", **options):
    return gpunet.connect(market["url"], token=market["tokens"][who], ca=market["ca_file"], budget=5_000, **options)


def test_the_magics_through_the_gateway(packaged_gateway, detached, shell, tmp_path, capsys):
    market = packaged_gateway
    token_file = tmp_path / "carol.token"
    token_file.write_text(market["tokens"]["carol"])
    shell.run_line_magic("gpunet", f"connect {market['url']} --token-file {token_file} --ca {market['ca_file']} "
                                   f'--budget 500 --pip "{PACKAGE}=={VERSION}"')
    try:
        shell.run_cell_magic("gpunet", "--quiet --timeout 120", f"import {PACKAGE}\nv = {PACKAGE}.__version__\n")
        assert shell.user_ns["v"] == VERSION
        usage = shell.run_line_magic("gpunet", "usage")
        try:
            assert "spent" in str(usage) and "alice" in str(usage)  # the provider that has the package ran it
        finally:
            usage.close()
        receipt = shell.run_line_magic("gpunet", "receipt")
        assert receipt.receipt["session"]["session"] == gpunet.current().session
        assert f"asks for {PACKAGE}=={VERSION}" in repr(shell.run_line_magic("gpunet", "env"))
    finally:
        shell.run_line_magic("gpunet", "disconnect")


def test_usage_and_receipt_through_the_gateway_are_the_notebooks_own(packaged_gateway, detached):
    market = packaged_gateway
    with _connect(market) as net:
        assert net.run(lambda: 6 * 7, timeout=120) == 42
        usage = SessionUsage(net)
        shown = str(usage)
        assert f"session {net.session}: spent {usage.numbers['spent']}" in shown
        assert usage.numbers["spent"] > 0 and usage.numbers["budget"] == 5_000
        assert "preauthorized" in usage.numbers and "held_for_jobs" in usage.numbers
        rows = usage.rows()
        assert len(rows) == 1 and rows[0][0] in ("alice", "bob") and rows[0][3] == 1  # provider, tasks
        receipt = SessionReceipt(net)
        assert receipt.receipt["session"]["session"] == net.session and receipt.summary["entries"] >= 2  # open, hold, ...
        assert receipt.summary["service"].rstrip("/") == market["service"].url.rstrip("/")
        assert "check it: gpunet ledger verify --receipt" in str(receipt)

        # dave, another client account, tries carol's session through the gateway and at the bank
        ca, dave = market["ca_file"], {"Authorization": f"Bearer {market['tokens']['dave']}"}
        calls = [("GET", path) for path in ("receipt", "spending", "usage", "environments",
                                               "ledger/consistency?first=1", "state", "providers")]
        calls += [("POST", "capabilities"), ("POST", "jobs"), ("POST", "jobs/0123456789abcdef/stop"), ("DELETE", "")]
        for method, path in calls:  # every route of a session: reading it, sending, stopping, closing it
            answer = requests.request(method, f"{market['url']}/v1/sessions/{net.gateway_session}/{path}".rstrip("/"),
                                      headers=dave, data=pack({"code": "x = 1"}) if method == "POST" else None,
                                      verify=ca, timeout=WAIT_S)
            assert answer.status_code == 404, (method, path)
            assert "no such session of yours" in unpack(answer.content)["error"]["message"]
        assert net.run(lambda: 6 * 7, timeout=120) == 42  # carol's session goes on
        with market["service"].client(market["tokens"]["dave"]) as bank, pytest.raises(ForbiddenError):
            bank.receipt(net.session)
        answer = requests.get(f"{market['url']}/v1/sessions/{net.gateway_session}/ledger/consistency?first=x",
                              headers={"Authorization": f"Bearer {market['tokens']['carol']}"}, verify=ca,
                              timeout=WAIT_S)
        assert answer.status_code == 422 and "ledger size" in unpack(answer.content)["error"]["message"]
        carols = net.session
    with _connect(market, "dave") as his:  # his own session's receipt is his, not carol's
        assert SessionReceipt(his).receipt["session"]["session"] == his.session != carols
    verify_service(market["service"].url, market["service"].operator_token)


def test_a_verified_result_is_reused_for_the_same_account_only(packaged_gateway, detached, capsys):
    market = packaged_gateway
    code = "total = sum(range(n)) * 3\n"
    with _connect(market) as net:
        first: dict = {"n": 1000}
        ran = net.run_cell(code, first, verify="replicate:2", timeout=120, quiet=True)
        assert first["total"] == 1498500 and ran.provenance["verification"]["verdict"] == "verified"
        capsys.readouterr()
        again: dict = {"n": 1000}
        reused = net.run_cell(code, again, verify="replicate:2", timeout=120, quiet=True)
        assert again["total"] == 1498500
        assert f"gpunet: reused verified result of job {ran.remote.job.job_id}" in capsys.readouterr().out
        record = reused.provenance
        assert record["verification"]["reused_from"]["job"] == ran.remote.job.job_id
        assert record["payment"]["holds"] == [] and reused.remote.holds == []
        other: dict = {"n": 1001}  # other inputs: computed
        net.run_cell(code, other, verify="replicate:2", timeout=120, quiet=True)
        assert other["total"] == 1501500 and "reused" not in capsys.readouterr().out
        fresh: dict = {"n": 1000}  # --no-reuse: computed again
        net.run_cell(code, fresh, verify="replicate:2", timeout=120, quiet=True, reuse=False)
        assert "reused" not in capsys.readouterr().out
        assert net.run(lambda n: sum(range(n)) * 3, 1000, verify="replicate:2", timeout=120) == 1498500
        assert "reused" not in capsys.readouterr().out  # net.run is never answered from the table
    with _connect(market, "dave") as his:  # the same code and inputs from another account: computed
        theirs: dict = {"n": 1000}
        record = his.run_cell(code, theirs, verify="replicate:2", timeout=120, quiet=True).provenance
        assert theirs["total"] == 1498500 and "reused_from" not in record["verification"]
        assert record["payment"]["holds"] and "reused" not in capsys.readouterr().out


def test_a_cells_packages_place_it_through_the_gateway(packaged_gateway, detached, capsys):
    market = packaged_gateway
    with _connect(market, pip=[f"{PACKAGE}=={VERSION}"]) as net:  # what the import finds too, as --pip
        alice, bob = _workers_of(net, "alice")[0], _workers_of(net, "bob")[0]
        namespace: dict = {}
        cell = net.run_cell(f"import {PACKAGE}\nversion = {PACKAGE}.__version__\n", namespace, timeout=180,
                            quiet=True)
        assert namespace["version"] == VERSION and cell._results[0].worker == alice  # the one that has it
        assert cell.provenance["environment"] == {"requirements": {PACKAGE: f"=={VERSION}"}}
        assert cell.provenance["ran"][0]["environment"]["packages"] == {PACKAGE: VERSION}
        shown = repr(SessionEnvironment(net))
        assert f"asks for {PACKAGE}=={VERSION}" in shown
        assert f"{alice}  alice  has every package" in shown and f"{bob}  bob  would install {PACKAGE}" in shown
        # a version no provider has and none can install within its cap: refused before it runs
        with pytest.raises(PackageError, match="humanize 4.9.0 went over the provider's size cap"):
            net.run_cell(f"import {PACKAGE}\n", {}, timeout=180, quiet=True, pip=["humanize==4.9.0"])
        # a requirement that is no distribution's name never reaches a worker
        with pytest.raises(GatewayError, match="is not a distribution's name") as bad:
            net.link.call("POST", f"/sessions/{net.gateway_session}/jobs",
                          {"code": "x = 1", "environment": {"requirements": {"--index-url": "==1"}}})
        assert bad.value.status == 422
        # a GPU build where no provider has a GPU: refused before anything is sent, saying so
        with pytest.raises(PackageError, match=r"no provider with a GPU can run it(.|\n)*Nothing was sent"):
            net.run_cell("x = 1\n", {}, timeout=180, quiet=True, pip=["jax[cuda12]"])
        # alice leaves: bob installs it for this session, once, then reuses it
        stop(next(p for p in market["processes"] if "alice" in " ".join(p.args)))
        deadline = time.monotonic() + WAIT_S
        while alice in (net.environment_reports(fresh=True) or {}):
            assert time.monotonic() < deadline, "alice's worker stayed in the scheduler's reports"
            time.sleep(0.2)
        capsys.readouterr()
        started = time.monotonic()
        first = net.run_cell(f"import {PACKAGE}\nwhere = {PACKAGE}.__file__\n", namespace, timeout=180)
        first_s = time.monotonic() - started
        assert f"installing 1 package (0.0 MB) on {bob}" in capsys.readouterr().err
        assert first._results[0].worker == bob and first._results[0].environment["built_now"] is True
        started = time.monotonic()
        second = net.run_cell(f"import {PACKAGE}\nagain = {PACKAGE}.__version__\n", namespace, timeout=180,
                              quiet=True)
        second_s = time.monotonic() - started
        assert namespace["again"] == VERSION and second._results[0].environment["built_now"] is False
        print(f"\nthrough the gateway: first cell (one install) {first_s:.2f} s, second cell (reused) {second_s:.2f} s")
