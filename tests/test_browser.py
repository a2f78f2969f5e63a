"""gpunet's displays in a real browser: JupyterLab and Voila on 127.0.0.1, driven by Playwright
in headless Chromium (Debian's ``chromium``), against a metered market of real processes (a
credit service, a metered scheduler, two providers).

One JupyterLab server and one market serve the whole module. The notebook runs metered
cells with the provider dashboard open; the numbers in the page must equal the credit
service's, change while cells run, and the kernel must answer while the dashboard
refreshes; after saving, closing and reopening, no widget error shows and the final
progress text is there. Each test saves a screenshot in its tmp dir.

Needs the ``browser`` extra (jupyterlab, voila, playwright) and a Chromium; skipped, saying
why, where one is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpunet_processes import expect, metered_market, start, stop
from network_probes import wait_until

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
WIDGET_ERRORS = ("Error displaying widget", "model not found")


def _chromium() -> str | None:
    found = os.environ.get("GPUNET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found or next((path for path in CHROMIUM_CANDIDATES if os.access(path, os.X_OK)), None)


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    import importlib.util

    for module, extra in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("voila", "voila")):
        if importlib.util.find_spec(module) is None:
            return f"{extra} is not installed (pip install -e '.[browser]')"
    if _chromium() is None:
        return "no Chromium found (apt-get install chromium; .ci/run installs it)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser tests: {_missing()}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server stopped (exit {process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listened on 127.0.0.1:{port} within {timeout:g} s:\n{log.read_text()[-3000:]}")


# -- the module's servers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """Credit service, metered scheduler, providers alice and bob, client carol."""
    folder = tmp_path_factory.mktemp("market")
    with metered_market(folder) as market:
        market["alice_token_file"] = folder / "alice-token"
        market["alice_token_file"].write_text(market["tokens"]["alice"])
        market["alice_token_file"].chmod(0o600)
        yield market


@pytest.fixture(scope="module")
def lab(market, tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 whose kernels reach the market as carol (the
    environment's GPUNET_SCHEDULER / GPUNET_CREDITS / GPUNET_TOKEN); every file it writes
    is in a tmp dir."""
    folder = tmp_path_factory.mktemp("lab")
    root = folder / "notebooks"
    root.mkdir()
    settings = folder / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(folder / "config"), JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
               IPYTHONDIR=str(folder / "ipython"), GPUNET_SCHEDULER=market["address"],
               GPUNET_CREDITS=market["service"].url, GPUNET_TOKEN=market["tokens"]["carol"], PYTHONUNBUFFERED="1")
    log = folder / "lab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}",
               "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={folder / 'settings'}",
               f"--LabApp.workspaces_dir={folder / 'workspaces'}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--allow-root"]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                  start_new_session=True)
    try:
        _wait_listening(port, server, 90, log)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "log": log}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh page; its screenshot is saved in the test's tmp dir whatever the outcome."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    yield page
    page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
    context.close()


# -- driving JupyterLab ---------------------------------------------------------------------


def _notebook(path: Path, cells: list[str]) -> None:
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}))


def _open(page, lab, name: str) -> None:
    """Open notebook ``name`` and wait until its kernel has started and is idle."""
    # ?reset: a fresh workspace, so that this notebook is the only one open
    page.goto(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    wait_until(lambda: _kernel_state(lab, name) == "idle", 90, f"the kernel of {name} to start")
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=30_000)


def _kernel_state(lab, name: str) -> str | None:
    """The execution state of the kernel of notebook ``name``, as the server knows it."""
    import requests

    sessions = requests.get(f"{lab['url']}/api/sessions", headers={"Authorization": f"token {lab['token']}"},
                            timeout=10).json()
    return next((session["kernel"].get("execution_state") for session in sessions
                 if session.get("path") == name and session.get("kernel")), None)


def _cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _run(page, index: int) -> None:
    """Run cell ``index`` as a user does: click into it, Shift+Enter."""
    cell = _cell(page, index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _ran(page, index: int, timeout: float = 120) -> None:
    prompt = _cell(page, index).locator(".jp-InputArea-prompt")
    deadline = time.monotonic() + timeout
    while not re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"cell {index} did not finish within {timeout:g} s: {_cell(page, index).inner_text()}")
        time.sleep(0.1)


def _figure(page, name: str) -> str:
    return page.locator(f".gpunet-live [data-gpunet='{name}']").first.inner_text().strip()


def _page_matches_service(page, market) -> bool:
    earned = market["operator"].earnings("alice")
    shown = {name: _figure(page, name) for name in ("earned", "balance", "tasks")}
    return shown == {"earned": str(earned["total"]["credits"]), "balance": str(earned["balance"]),
                     "tasks": str(earned["total"]["tasks"])}


# -- the tests -------------------------------------------------------------------------------


def test_dashboard_in_jupyterlab_is_live_matches_the_service_and_reopens_clean(lab, market, page, tmp_path):
    name = "provider.ipynb"
    _notebook(lab["root"] / name, [
        "%load_ext gpunet\n%gpunet connect",
        f"import gpunet\ndash = gpunet.ProviderDashboard(token_file={str(market['alice_token_file'])!r}, "
        "interval=0.5)\ndash",
        "%%gpunet --map i=range(12)\nimport time\ntime.sleep(0.4)\nsquare = i * i",
        "6 * 7",
        "dash.close()\nsum(square)",
        "usage = gpunet.SessionUsage()\nusage",
        "usage.close()",
        "import ipywidgets\nipywidgets.Label('widgets render here')",
    ])
    _open(page, lab, name)
    _run(page, 0)
    _ran(page, 0)
    _run(page, 1)
    _ran(page, 1)
    page.wait_for_selector(".gpunet-live [data-gpunet='earned']", timeout=60_000)
    wait_until(lambda: _page_matches_service(page, market), 30, "the dashboard's figures to equal the service's")
    before = int(_figure(page, "earned"))

    _run(page, 2)  # a map over both providers: alice earns while it runs
    wait_until(lambda: int(_figure(page, "earned")) > before, 90, "the dashboard to show what alice earns")
    _ran(page, 2)
    wait_until(lambda: _page_matches_service(page, market), 30, "the dashboard's figures to equal the service's "
                                                             "once the map is paid")
    assert market["operator"].earnings("alice")["total"]["tasks"] >= 1
    page.screenshot(path=str(tmp_path / "live.png"), full_page=True)

    # the kernel answers a cell while the dashboard refreshes
    refreshed = page.locator(".gpunet-live .gpunet-panel").first.inner_text()
    _run(page, 3)
    _ran(page, 3, timeout=30)
    assert "42" in _cell(page, 3).locator(".jp-OutputArea").inner_text()
    wait_until(lambda: page.locator(".gpunet-live .gpunet-panel").first.inner_text() != refreshed, 30,
           "the dashboard to refresh after the cell")

    _run(page, 4)  # closing the dashboard leaves its last state, static
    _ran(page, 4)
    assert "506" in _cell(page, 4).locator(".jp-OutputArea").inner_text()  # the sum of the squares of 0..11
    wait_until(lambda: page.locator(".gpunet-live").count() == 0, 30, "the dashboard's widget to be replaced")
    assert "stopped" in _cell(page, 1).locator(".jp-OutputArea").inner_text()
    _run(page, 5)
    _ran(page, 5)
    page.wait_for_selector(".gpunet-live [data-gpunet='spent']", timeout=30_000)
    progress = _cell(page, 2).locator(".jp-OutputArea").inner_text()
    assert re.search(r"gpunet: done.* 12/12 · \d+\.\d s", progress), progress

    _save(page, lab, name)

    # closed and reopened, its kernel still running (JupyterLab's default): the live usage is
    # still live, the finished displays are their final states
    page.goto("about:blank")
    _open(page, lab, name)
    wait_until(lambda: re.search(r"gpunet: done.* 12/12", page.locator(".jp-Notebook").inner_text()), 30,
               "the final progress line in the reopened notebook")
    page.wait_for_selector(".gpunet-live [data-gpunet='spent']", timeout=30_000)
    _no_widget_errors(page)
    # A display's id lives in the page that showed it: shown again here, then stopped, it
    # leaves its last state, static
    _run(page, 5)
    _ran(page, 5)
    page.wait_for_selector(".gpunet-live [data-gpunet='spent']", timeout=30_000)
    _run(page, 6)
    _ran(page, 6)
    wait_until(lambda: page.locator(".gpunet-live").count() == 0, 30, "the usage's widget to be replaced")
    _save(page, lab, name)

    # reopened with a new kernel: the stored outputs are the final states
    page.goto("about:blank")
    _shut_down_kernels(lab)
    _open(page, lab, name)
    wait_until(lambda: re.search(r"gpunet: done.* 12/12", page.locator(".jp-Notebook").inner_text()), 30,
               "the final progress line in the reopened notebook")
    _run(page, 7)  # a widget of the new kernel renders: the widget manager has restored what it could
    page.wait_for_selector(".widget-label:has-text('widgets render here')", timeout=60_000)
    text = _no_widget_errors(page)
    assert "credits earned" in text and "gpunet session" in text  # the dashboard's and usage's last states
    page.screenshot(path=str(tmp_path / "reopened.png"), full_page=True)
    _saved_outputs_stand_alone(lab["root"] / name, tmp_path)


def _save(page, lab, name: str) -> None:
    """Ctrl+S, and wait until the file on disk has the page's last outputs."""
    before = (lab["root"] / name).stat().st_mtime_ns
    page.keyboard.press("Control+s")
    wait_until(lambda: (lab["root"] / name).stat().st_mtime_ns != before, 30, "the notebook to be saved")


def _no_widget_errors(page) -> str:
    """The notebook's text, once it has none of the widget errors nor a widget's repr."""
    text = page.locator(".jp-Notebook").inner_text()
    for error in WIDGET_ERRORS:
        assert error not in text, f"{error!r} in the reopened notebook:\n{text}"
    assert "HBox(" not in text and "VBox(" not in text, text
    return text


def _shut_down_kernels(lab) -> None:
    import requests

    headers = {"Authorization": f"token {lab['token']}"}
    for kernel in requests.get(f"{lab['url']}/api/kernels", headers=headers, timeout=10).json():
        requests.delete(f"{lab['url']}/api/kernels/{kernel['id']}", headers=headers, timeout=30)


def _saved_outputs_stand_alone(path: Path, tmp_path: Path) -> None:
    """Every stored widget view has a static text/html beside it, and nbconvert's HTML (which
    has no widget state) shows the final states."""
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                assert "text/html" in data, output
            assert not str(data.get("text/plain", "")).startswith(("HBox(", "VBox(")), output
    html = tmp_path / "notebook.html"
    subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", str(path), "--output", str(html)],
                   check=True, capture_output=True, timeout=120)
    text = html.read_text()
    assert re.search(r"gpunet: done.* 12/12", text) and "credits earned" in text
    assert not any(error in text for error in WIDGET_ERRORS)


def test_dashboard_opens_beside_the_notebook(lab, market, page, tmp_path):
    name = "beside.ipynb"
    _notebook(lab["root"] / name, [
        f"import gpunet\ndash = gpunet.ProviderDashboard(token_file={str(market['alice_token_file'])!r})\n"
        "side = dash.open_beside()",
        "dash.close()",
    ])
    _open(page, lab, name)
    _run(page, 0)
    _ran(page, 0)
    panel = page.locator(".gpunet-live")  # anywhere: in the side panel
    wait_until(lambda: panel.count() > 0, 30, "the dashboard in the side panel")
    wait_until(lambda: _page_matches_service(page, market), 30, "the side panel's figures to equal the service's")
    assert _cell(page, 0).locator(".gpunet-live").count() == 0, "shown beside the notebook, not in it"
    page.screenshot(path=str(tmp_path / "beside.png"))
    _run(page, 1)
    _ran(page, 1)
    wait_until(lambda: panel.count() == 0, 30, "the side panel to close with the dashboard")
    _shut_down_kernels(lab)


def test_gpunet_dashboard_serves_a_voila_page(market, page):
    server = start(["dashboard", "--token-file", str(market["alice_token_file"]), "--credits",
                    market["service"].url, "--scheduler", market["address"]])
    try:
        url = expect(server, r"dashboard: (http://127\.0\.0\.1:\d+/\?token=\S+)", timeout=120).group(1)
        page.goto(url)
        page.wait_for_selector(".gpunet-live [data-gpunet='earned']", timeout=120_000)
        wait_until(lambda: _page_matches_service(page, market), 30, "the page's figures to equal the service's")
        wait_until(lambda: "2 worker(s)" in page.inner_text("body") or "worker(s) online" in page.inner_text("body"),
               30, "her workers")
        assert "alice" in page.inner_text("body")
        assert market["tokens"]["alice"] not in page.content(), "the page never shows her token"
        import requests

        refused = requests.get(url.split("?")[0], allow_redirects=False, timeout=30)  # without the page's token
        assert refused.status_code in (302, 401, 403) and "data-gpunet" not in refused.text, refused.status_code
    finally:
        out = stop(server)
    assert "gpunet dashboard: stopped" in out, out


def test_gpunet_dashboard_refuses_a_clients_token(market, tmp_path):
    token_file = tmp_path / "carol-token"
    token_file.write_text(market["tokens"]["carol"])
    out = subprocess.run([sys.executable, "-m", "gpunet.cli", "dashboard", "--token-file", str(token_file),
                          "--credits", market["service"].url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "a client account, not a provider's" in out.stderr, out.stderr
