"""gpunet's displays without a browser: every one leaves a static final state (what a saved
notebook keeps), the live ones refresh in a thread and stop when closed, and the provider
dashboard reads a provider's own figures (and refuses any other token). In a browser:
tests/test_browser.py."""

from __future__ import annotations

import threading
import time

import pytest
from IPython.utils.capture import capture_output

import gpunet
from gpunet.ui.look import WIDGET_VIEW
from gpunet.ui.progress import JobProgress
from network_probes import wait_until


def _display_id(output) -> str:
    return (output.transient or {}).get("display_id", "")


def test_a_finished_progress_leaves_its_final_line_static():
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()  # display() publishes through it
    with capture_output() as captured:
        progress = JobProgress("gpunet", total=3, widget=True)
        progress.running("tcp://127.0.0.1:1", "cpu: test")
        progress.tick(done=2)
        progress.finish(ok=True)
    first, last = captured.outputs[0], captured.outputs[-1]
    # shown: the widget, and beside it its state as HTML and text (never the widget's repr)
    assert WIDGET_VIEW in first.data and "queued" in first.data["text/html"]
    assert not first.data["text/plain"].startswith("HBox(")
    # finished: the same display replaced by the final line alone
    assert last.update and _display_id(last) == _display_id(first) != ""
    assert WIDGET_VIEW not in last.data
    assert "done on tcp://127.0.0.1:1 (cpu: test) 3/3" in last.data["text/plain"]
    assert "done on tcp://127.0.0.1:1" in last.data["text/html"] and "#1a7f37" in last.data["text/html"]


def test_session_usage_refreshes_in_a_thread_until_closed(net):
    usage = gpunet.SessionUsage(net, interval=0.05)
    box = usage.widget()  # starts refreshing
    assert usage.live
    before = usage.refreshes
    wait_until(lambda: usage.refreshes >= before + 3, 30, "three refreshes")
    assert 'data-gpunet="left"' in box.children[0].value and "live, every 0.05 s" in box.children[0].value
    net.run(lambda: 1)  # the kernel's own work goes on meanwhile
    usage.close()
    assert not usage.live and not usage._thread.is_alive()
    assert "stopped" in usage._repr_html_()
    assert "spent" in str(usage) and "left" in str(usage)


def test_an_interval_must_be_positive(net):
    with pytest.raises(gpunet.GpunetError, match="interval must be a positive number of seconds"):
        gpunet.SessionUsage(net, interval=0)


def test_the_network_shows_itself_in_html_with_its_gpunet_page(net):
    import requests

    from gpunet.ui.status import gpunet_page

    html = net._repr_html_()
    assert net.address in html and "gpunet network" in html and "credits: spent" in html
    page = gpunet_page(net.dashboard_link)
    assert page in html
    answer = requests.get(page, timeout=30)
    assert answer.status_code == 200 and "local-provider" in answer.text
    assert all(worker.address in answer.text for worker in net.workers())


@pytest.fixture
def local_provider(net):
    embedded = net.embedded
    return {"token": embedded.provider_token, "credits": embedded.credits_url, "scheduler": net.address}


def test_the_provider_dashboard_shows_her_figures_and_workers(net, local_provider):
    net.run(lambda: sum(range(1000)))  # paid to the local provider, once the scheduler has reported it
    wait_until(lambda: net.meter.wait_settled() and net.meter.usage()["held_for_jobs"] == 0
               and net.metering_state()["queued"] == 0, 30,
               "the settlement to be reported")
    dash = gpunet.ProviderDashboard(local_provider["token"], credits=local_provider["credits"],
                                    scheduler=local_provider["scheduler"], interval=0.05)
    try:
        earned = dash.credits.earnings("local-provider")
        figures = {name: value for name, _, value in dash.figures()}
        assert figures["earned"] == earned["total"]["credits"] >= 1 and figures["balance"] == earned["balance"]
        assert figures["tasks"] == earned["total"]["tasks"] >= 1
        assert len(dash.workers) == len(net.workers()) and all(row[-1] == "idle" for row in dash.workers)
        assert "local-provider" in str(dash) and "reputation" in str(dash)
        html = dash._repr_html_()
        assert 'data-gpunet="earned"' in html and "quarantine below 0.5" in html
        assert net.session not in html, "nothing of the client's"
        job = threading.Thread(target=net.run, args=(time.sleep, 3))  # what her worker runs now
        job.start()
        try:
            wait_until(lambda: dash.refresh() and any(row[-1].startswith("single job") for row in dash.workers),
                       30, "the running job in her workers' table")
            assert dash.held >= 1 and dash.running == 1
        finally:
            job.join(timeout=60)
        box = dash.widget()
        wait_until(lambda: dash.refreshes >= 3, 30, "three refreshes")
        assert box.children[1].value, "a plot of earnings and utilisation"
    finally:
        dash.close()
    assert not dash.live


def test_the_provider_dashboard_refuses_what_is_not_a_providers(net, local_provider, tmp_path, monkeypatch):
    for name in ("GPUNET_TOKEN", "GPUNET_TOKEN_FILE", "GPUNET_CREDITS", "GPUNET_SCHEDULER"):
        monkeypatch.delenv(name, raising=False)
    credits = local_provider["credits"]
    with pytest.raises(gpunet.GpunetError, match="a client account, not a provider's"):
        gpunet.ProviderDashboard(net.embedded.client_token, credits=credits)
    with pytest.raises(gpunet.GpunetError, match="needs your provider token"):
        gpunet.ProviderDashboard(credits=credits)
    with pytest.raises(gpunet.GpunetError, match="give credits=URL"):
        gpunet.ProviderDashboard(local_provider["token"])
    with pytest.raises(gpunet.GpunetError, match="cannot read the token file"):
        gpunet.ProviderDashboard(token_file=tmp_path / "missing", credits=credits)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(gpunet.GpunetError, match="is empty"):
        gpunet.ProviderDashboard(token_file=tmp_path / "empty", credits=credits)
    with pytest.raises(gpunet.CreditsError, match="unknown bearer token"):
        gpunet.ProviderDashboard("not-a-token", credits=credits)
    token_file = tmp_path / "token"
    token_file.write_text(local_provider["token"] + "\n")
    monkeypatch.setenv("GPUNET_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("GPUNET_CREDITS", credits)
    dash = gpunet.ProviderDashboard()  # all from the environment
    try:
        assert dash.account == "local-provider" and "give scheduler=ADDRESS" in str(dash)
    finally:
        dash.close()
