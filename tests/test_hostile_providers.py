"""A provider attacks the notebook it works for, and nothing it sends runs there.

Every part runs as it would for real: a credit service, `gpunet scheduler`, and a
`gpunet provide` process whose worker runs a plugin this test installs
(:class:`gpunet.testing.HostilePlugin`), which replaces what the notebook receives
with pickles that write a marker file, hostile HTML and terminal escapes, or a
huge result. The notebook is a real IPython shell (and, once, a real ipykernel
through nbclient). On the embedded network, where results stay pickled, another
client forges events naming a running job.
"""

from __future__ import annotations

import logging
import threading
import time
from fractions import Fraction
from pathlib import Path

import nbformat
import pytest
from distributed import Client
from IPython.utils.capture import capture_output

import gpunet
from gpunet.testing import HostilePlugin, _WritesMarker
from gpunet.wire import sign_event
from gpunet_processes import metered_network


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Credit service, metered scheduler, one provider (mallory), a client account (carol),
    and mallory's own Dask client, with which it installs its plugin."""
    place = tmp_path_factory.mktemp("hostile")
    with metered_network(place, ["mallory"], "carol", credits=1_000_000) as network:
        attacker = Client(network["address"], set_as_default=False)  # the provider's owner trusts its own code
        try:
            yield {"address": network["address"], "credits": network["service"].url,
                   "token": network["tokens"]["carol"], "attacker": attacker, "place": place}
        finally:
            attacker.close()


def attack(hostile, kind: str, **options) -> Path:
    """Make mallory's worker run ``kind``; returns the marker file its pickles would write."""
    marker = hostile["place"] / f"ran-{kind}"
    hostile["attacker"].register_plugin(HostilePlugin(kind, str(marker), **options), name=HostilePlugin.name)
    return marker


@pytest.fixture
def notebook(shell, hostile, detached):
    """The IPython shell, connected to the hostile network as a stranger would be (no --trust-providers)."""
    for name in ("y", "df"):
        shell.user_ns.pop(name, None)
    with capture_output():
        shell.run_line_magic("gpunet", f"connect {hostile['address']} --credits {hostile['credits']} "
                                       f"--token {hostile['token']} --max-result-bytes {8 * 1024 * 1024}")
    net = gpunet.current()
    assert not net.trusts_providers
    yield shell
    net.close()


def run_cell(shell, source: str):
    with capture_output() as captured:
        outcome = shell.run_cell(source)
    return outcome, captured


@pytest.mark.parametrize("kind", ["pickle", "to-pickle"])
def test_a_providers_pickles_never_run_in_the_notebook(notebook, hostile, kind):
    marker = attack(hostile, kind)
    outcome, captured = run_cell(notebook, "%%gpunet --timeout 60\ny = 41 + 1")
    assert isinstance(outcome.error_in_exec, gpunet.GpunetError)
    assert "not loaded" in str(outcome.error_in_exec)
    assert "y" not in notebook.user_ns
    with pytest.raises(gpunet.GpunetError, match="not loaded"):
        gpunet.current().run(abs, -3, timeout=60)
    assert not marker.exists(), "a pickle a provider sent ran in the notebook"


def test_a_providers_html_scripts_and_escapes_are_stripped(notebook, hostile):
    attack(hostile, "html")
    outcome, captured = run_cell(notebook, "%%gpunet --timeout 60\nfrom IPython.display import HTML\nHTML('<i>ok</i>')")
    assert outcome.error_in_exec is None
    shown = [output.data for output in captured.outputs]
    html = " ".join(data.get("text/html", "") for data in shown)
    assert "<i>ok</i>" in html and "<b>hi</b>" in html
    for bad in ("<script", "onerror", "<iframe", "evil.example"):
        assert bad not in html
    assert not any("application/javascript" in data for data in shown)
    assert "dropped application/javascript" in captured.stderr
    text = captured.stdout + captured.stderr + "".join(data.get("text/plain", "") for data in shown)
    assert "\x1b" not in text and "\x07" not in text


def test_a_huge_result_is_refused_within_the_timeout_with_bounded_memory(notebook, hostile):
    attack(hostile, "huge", huge_bytes=300 * 1024 * 1024)
    before = _rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak below is this test's
    started = time.monotonic()
    outcome, _ = run_cell(notebook, "%%gpunet --timeout 60\ny = 1")
    assert time.monotonic() - started < 60
    assert isinstance(outcome.error_in_exec, gpunet.GpunetError)
    assert "cap" in str(outcome.error_in_exec) and "y" not in notebook.user_ns
    assert _peak_rss_bytes() - before < 100 * 1024 * 1024


def test_an_output_the_codec_cannot_carry_is_refused_by_name(notebook, hostile):
    attack(hostile, "none")
    outcome, _ = run_cell(notebook, "%%gpunet --timeout 60 --out y\nfrom fractions import Fraction\ny = Fraction(1, 3)")
    assert "output 'y' is a fractions.Fraction" in str(outcome.error_in_exec)
    assert "Return its data instead" in str(outcome.error_in_exec) and "y" not in notebook.user_ns
    outcome, _ = run_cell(notebook, "%%gpunet --timeout 60\ny = {'x': [1.5, 2]}")
    assert outcome.error_in_exec is None and notebook.user_ns["y"] == {"x": [1.5, 2]}


def test_a_remote_exception_stays_catchable_as_its_builtin_type(notebook, hostile):
    attack(hostile, "none")
    outcome, captured = run_cell(notebook, "%%gpunet --timeout 60\nd = {}\n\nd['missing']")
    assert isinstance(outcome.error_in_exec, KeyError) and isinstance(outcome.error_in_exec, gpunet.GpunetError)
    assert "line 3" in "\n".join(outcome.error_in_exec._render_traceback_())


def test_an_ipykernel_notebook_saves_only_sanitized_html(hostile, tmp_path, monkeypatch):
    from gpunet.demo import run_notebook

    marker = attack(hostile, "html")
    monkeypatch.delenv("GPUNET_SCHEDULER", raising=False)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext gpunet"),
        nbformat.v4.new_code_cell(f"%gpunet connect {hostile['address']} --credits {hostile['credits']} "
                                  f"--token {hostile['token']}"),
        nbformat.v4.new_code_cell("%%gpunet --timeout 60\nfrom IPython.display import HTML\nHTML('<i>ok</i>')"),
    ])
    path = tmp_path / "attacked.ipynb"
    nbformat.write(notebook, path)
    _, executed = run_notebook(path)
    saved = executed.read_text()
    outputs = nbformat.reads(saved, as_version=4).cells[2].outputs
    html = " ".join(output.get("data", {}).get("text/html", "") for output in outputs)
    assert "<i>ok</i>" in html and "<b>hi</b>" in html
    for bad in ("<script", "onerror", "<iframe", "evil.example"):
        assert bad not in html
    assert not any("application/javascript" in output.get("data", {}) for output in outputs)
    assert "alert(2)" not in saved and "dropped application/javascript" in saved
    assert "\\u001b" not in saved and "\\u0007" not in saved  # no terminal escapes, as JSON writes them
    assert not marker.exists()


# -- the embedded network: results stay pickled, events must come from the job's worker ----------


def test_the_embedded_network_still_returns_any_object(ip, net):
    assert net.trusts_providers
    ip.run_cell("%%gpunet\nfrom fractions import Fraction\nclass Point:\n    x = 3\np, f = Point(), Fraction(1, 3)")
    assert ip.user_ns["f"] == Fraction(1, 3) and ip.user_ns["p"].x == 3
    assert net.run(Fraction, 2, 6) == Fraction(1, 3)


def test_forged_events_naming_a_job_are_ignored(ip, net, tmp_path, caplog):
    marker = tmp_path / "ran-forged"
    forger = Client(net.address, set_as_default=False)  # any other party on the scheduler
    try:
        sent = threading.Event()

        def forge() -> None:  # while the cell runs: a result event with a pickled output, and output text
            from gpunet.client.network import current

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not current()._jobs:
                time.sleep(0.02)
            job_id = next(iter(current()._jobs))
            import cloudpickle

            fake = {"job_id": job_id, "index": None, "worker": "tcp://forger", "device": "cpu", "started": 0.0,
                    "finished": 0.0, "outputs": {"y": cloudpickle.dumps(_WritesMarker(str(marker)))}}
            forger.log_event(net.topic, {"job": job_id, "kind": "result", "index": None, "result": fake})
            forger.log_event(net.topic, sign_event("a guessed key", {"job": job_id, "kind": "stream", "seq": 99,
                                                                     "name": "stdout", "text": "FORGED\n"}))
            sent.set()

        thread = threading.Thread(target=forge, daemon=True)
        thread.start()
        with caplog.at_level(logging.WARNING, logger="gpunet"), capture_output() as captured:
            ip.run_cell("%%gpunet\nimport time\ntime.sleep(3)\ny = 'real'")
        thread.join(60)
        assert sent.is_set()
        assert ip.user_ns["y"] == "real"
        assert "FORGED" not in captured.stdout
        assert not marker.exists()
        assert "that its worker did not send" in caplog.text
    finally:
        forger.close()


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")
