"""%%gpunet driven through a real IPython shell against a real local Dask network."""

from __future__ import annotations

import os
import re
import sys
import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

from gpunet.errors import (
    CellSyntaxError,
    CellTimeoutError,
    MissingOutputError,
    PlacementError,
    UnpicklableInputError,
)
from network_probes import ctrl_c_once_it_runs, process_alive, running_jobs, spy_on_sending, wait_until


def run(ip, body, flags=""):
    with capture_output() as captured:
        ip.run_cell_magic("gpunet", flags, body)
    return captured


@pytest.fixture
def sent(net, monkeypatch):
    """What reached Dask while the test ran: one name per call of the shared network's
    ``client.submit`` / ``map`` / ``scatter``, the only ways a job's tasks and inputs
    are sent (gpunet/client/submit.py, verified.py). Empty means nothing was sent."""
    return spy_on_sending(monkeypatch, net)


def test_inputs_travel_and_outputs_come_back(ip):
    ip.user_ns.update(x=20, untouched="local")
    run(ip, "y = x + 1\nz = [y] * 2")
    assert ip.user_ns["y"] == 21
    assert ip.user_ns["z"] == [21, 21]
    assert ip.user_ns["untouched"] == "local"


def test_only_inputs_travel(ip):
    ip.user_ns.update(a=1, b=2, secret=object())
    run(ip, "seen = sorted(name for name in globals() if not name.startswith('__'))\ntotal = a + b")
    assert ip.user_ns["seen"] == ["a", "b"]
    assert ip.user_ns["total"] == 3


def test_in_and_out_override_detection(ip):
    ip.user_ns.update(a=1, b=2)
    run(ip, "c = a * 10\nd = 4", flags="--in a --out c")
    assert ip.user_ns["c"] == 10
    assert "d" not in ip.user_ns


def test_functions_defined_in_the_cell_come_back(ip):
    ip.user_ns["k"] = 3
    run(ip, "def triple(v):\n    return v * k\nnine = triple(3)")
    assert ip.user_ns["nine"] == 9
    assert ip.user_ns["triple"](2) == 6


#: A cell body's wait for the notebook to have shown its first output. The cell goes on
#: only once the file at ``seen_path`` exists, which :func:`live_stdout` creates when that
#: text reaches the notebook's stdout: so the cell's later output proves the first text
#: arrived while the cell still ran, however slow the machine (no timing involved).
WAIT_UNTIL_SEEN = (
    "import os, time\n"
    "deadline = time.monotonic() + 60\n"
    "while not os.path.exists(seen_path) and time.monotonic() < deadline:\n"
    "    time.sleep(0.02)\n"
    "seen = os.path.exists(seen_path)\n"
)


def live_stdout(ip, tmp_path, body, first):
    """Run a cell with ``seen_path`` as an input; create that file once ``first`` has
    reached the notebook's stdout. Returns the stdout text, in the order it came."""
    seen_path = tmp_path / "first-text-seen"
    ip.user_ns["seen_path"] = str(seen_path)
    arrivals = []

    class Recorder:
        def write(self, text):
            arrivals.append(text)
            if first in "".join(arrivals):
                seen_path.touch()

        def flush(self):
            pass

    original, sys.stdout = sys.stdout, Recorder()
    try:
        ip.run_cell_magic("gpunet", "--quiet --timeout 120", body)
    finally:
        sys.stdout = original
    return "".join(arrivals)


def test_stdout_arrives_while_the_cell_runs(ip, tmp_path):
    body = "print('first')\n" + WAIT_UNTIL_SEEN + "print('second' if seen else 'first was not shown while I ran')"
    texts = live_stdout(ip, tmp_path, body, first="first\n")
    assert texts == "first\nsecond\n", "'first' should show while the cell still runs"


def test_stderr_and_last_expression(ip):
    captured = run(ip, "import sys\nprint('oops', file=sys.stderr)\n6 * 7", flags="--quiet")
    assert "oops" in captured.stderr
    assert any(out.data.get("text/plain") == "42" for out in captured.outputs)


def test_matplotlib_figure_and_html_repr_display(ip):
    body = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3])\n"
        "class Card:\n"
        "    def _repr_html_(self):\n"
        "        return '<b>card</b>'\n"
        "from IPython.display import display\n"
        "display(Card())\n"
    )
    captured = run(ip, body, flags="--quiet")
    kinds = [sorted(out.data) for out in captured.outputs]
    assert ["text/html", "text/plain"] in kinds
    png = [out.data["image/png"] for out in captured.outputs if "image/png" in out.data]
    assert png and png[0][:4] == b"\x89PNG"


def test_remote_exception_keeps_its_type_and_cell_lines(ip):
    with pytest.raises(ZeroDivisionError) as caught:
        run(ip, "a = 1\nb = 0\nc = a / b\n", flags="--quiet")
    rendered = "\n".join(caught.value._render_traceback_())
    assert "line 3" in rendered and "c = a / b" in rendered
    assert "gpunet/remote.py" not in rendered
    assert "c" not in ip.user_ns


def test_syntax_error_is_reported_locally_with_its_line(ip, sent):
    with pytest.raises(CellSyntaxError) as caught:
        run(ip, "x = 1\ny = (2\nz = 3\n")
    assert caught.value.lineno in (2, 3)
    assert sent == [], "reported locally: nothing may reach the network"


def test_unknown_flag_gives_usage(ip):
    with pytest.raises(UsageError) as caught:
        run(ip, "x = 1", flags="--gpuz 2")
    assert "--gpuz" in str(caught.value) or "unrecognized" in str(caught.value)


def test_unpicklable_input_is_named(ip):
    ip.user_ns["lock"] = threading.Lock()
    with pytest.raises(UnpicklableInputError) as caught:
        run(ip, "held = lock.locked()")
    assert caught.value.name == "lock"
    assert "lock" in str(caught.value) and "_thread.lock" in str(caught.value)
    assert "held" not in ip.user_ns


def test_missing_output_changes_nothing(ip):
    ip.user_ns["kept"] = "before"
    with pytest.raises(MissingOutputError) as caught:
        run(ip, "kept = 'after'", flags="--out kept,never --quiet")
    assert caught.value.names == ["never"]
    assert ip.user_ns["kept"] == "before"


def test_unpicklable_detected_output_stays_on_the_worker(ip):
    captured = run(ip, "import threading\nguard = threading.Lock()\nn = 5", flags="--quiet")
    assert ip.user_ns["n"] == 5
    assert "guard" not in ip.user_ns
    assert "'guard'" in captured.stdout and "cannot be pickled" in captured.stdout


def test_gpus_that_no_worker_has_fail_at_once(ip, sent):
    with pytest.raises(PlacementError) as caught:
        run(ip, "x = 1", flags="--gpus 1")
    assert "GPU=1" in str(caught.value) and "no worker has a GPU" in str(caught.value)
    assert "device=1 (1)" not in str(caught.value)
    # At once: refused before anything was sent (a sent job would wait for a worker
    # with a GPU, without --timeout for ever).
    assert sent == []


def test_gpu_memory_that_no_worker_has_fails_at_once(ip):
    with pytest.raises(PlacementError) as caught:
        run(ip, "x = 1", flags="--gpu-mem 40GB")
    assert "GPU_MEM" in str(caught.value)


def test_map_spreads_items_and_gathers_in_order(ip, net):
    # A worker killed by an earlier test may still be restarting on a loaded machine:
    # spreading needs both connected first.
    wait_until(lambda: len(net.scheduler_workers(fresh=True)) >= 2, 60, "both workers to be connected")
    ip.user_ns["scale"] = 10
    run(ip, "import time, os\ntime.sleep(0.2)\nvalue = item * scale\npid = os.getpid()", flags="--map item=range(8) --quiet")
    assert ip.user_ns["value"] == [i * 10 for i in range(8)]
    assert len(set(ip.user_ns["pid"])) == 2, "both workers should take items"


def test_map_error_names_the_item(ip):
    with pytest.raises(ZeroDivisionError) as caught:
        run(ip, "r = 1 / (i - 2)", flags="--map i=range(4) --quiet")
    assert "item 2" in "\n".join(caught.value._render_traceback_())


def test_timeout_stops_the_cell_and_frees_the_worker(ip, net):
    started = time.monotonic()
    with pytest.raises(CellTimeoutError, match="timeout of 1 s"):
        run(ip, "while True:\n    pass", flags="--timeout 1 --quiet")
    # The endless loop ended by the timeout, not by anything else; 10 s is a bound
    # for a loaded machine, not the timeout's precision.
    assert time.monotonic() - started < 10
    # Stopped before the error was raised: no worker still runs it.
    assert all(keys == [] for keys in running_jobs(net).values()), running_jobs(net)
    run(ip, "import time\ntime.sleep(0.1)\nafter = 1", flags="--map i=range(2) --quiet --timeout 30")
    assert ip.user_ns["after"] == [1, 1]


def test_timeout_of_a_cell_stuck_in_c_restarts_its_worker(ip, net):
    before = set(net.client.run(os.getpid).values())
    with pytest.raises(CellTimeoutError):
        run(ip, "import time\ntime.sleep(60)", flags="--timeout 1 --quiet")

    # The worker restarts (its Nanny brings it back); both devices serve again. Right
    # after the error the stuck worker may not have exited yet, so wait for a worker
    # process that was not there before, beside the other one.
    def restarted():
        try:
            pids = set(net.client.run(os.getpid).values())
        except Exception:  # noqa: BLE001 - a worker leaving while asked
            return False
        return len(pids) == 2 and len(pids - before) == 1

    wait_until(restarted, 60, "the stuck worker to be replaced by a fresh process")
    run(ip, "import os\npid = os.getpid()", flags="--map i=range(6) --quiet --timeout 60")
    assert len(ip.user_ns["pid"]) == 6


def test_interrupt_cancels_the_remote_task(ip, net, tmp_path):
    beacon = tmp_path / "beacon"
    ip.user_ns["beacon_path"] = str(beacon)
    body = "import time\nwhile True:\n    open(beacon_path, 'a').write('.')\n    time.sleep(0.05)"
    # --timeout bounds the cell even if the signal were lost: the worker is free again
    # after it, so one lost SIGINT fails this test, not the ones after it.
    try:
        with pytest.raises(KeyboardInterrupt) as caught, capture_output() as captured, ctrl_c_once_it_runs(beacon):
            ip.run_cell_magic("gpunet", "--quiet --timeout 30", body)
    finally:
        handle = ip.user_ns.get("_gpunet")
        if handle is not None and not handle.done():
            handle.cancel()
    assert beacon.exists(), "the cell never ran"
    # One line says what happened and what it cost; the interrupt shows as one word.
    lines = [line for line in captured.stdout.splitlines() if line.startswith("gpunet:")]
    assert len(lines) == 1 and re.fullmatch(r"gpunet: cancelled after \d+\.\d s \(nothing charged\)", lines[0]), \
        captured.stdout
    assert caught.value._render_traceback_() == ["KeyboardInterrupt"]
    # The workers say the job's thread has left (run_job unregisters it only after
    # the cell's code ended), so the loop cannot write any more.
    wait_until(lambda: all(keys == [] for keys in running_jobs(net).values()), 30,
               "the workers to report the interrupted job gone")
    size = beacon.stat().st_size
    # A later job on both workers completes: had the loop still run, it would keep
    # writing meanwhile.
    run(ip, "after = i", flags="--map i=range(2) --quiet --timeout 60")
    assert ip.user_ns["after"] == [0, 1]
    assert beacon.stat().st_size == size, "the remote loop kept running after the interrupt"


def test_no_block_returns_at_once_and_outputs_land(ip, tmp_path):
    # The cell cannot finish before the notebook, after run() returned, lets it: so
    # run() returning at all proves it did not wait for the cell. (Had it waited, the
    # cell would give up after 60 s and `late` would say so.)
    release = tmp_path / "release"
    ip.user_ns["release_path"] = str(release)
    body = ("import os, time\ndeadline = time.monotonic() + 60\n"
            "while not os.path.exists(release_path) and time.monotonic() < deadline:\n    time.sleep(0.02)\n"
            "late = 'here' if os.path.exists(release_path) else 'the notebook waited for me'\ndel deadline")
    run(ip, body, flags="--no-block --quiet")
    handle = ip.user_ns["_gpunet"]
    assert not handle.done() and "late" not in ip.user_ns
    release.touch()
    assert handle.result(timeout=30) == {"late": "here"}
    assert ip.user_ns["late"] == "here"
    assert handle.done()


def test_progress_text_says_where_it_ran(ip):
    captured = run(ip, "x = 1")
    assert "done on tcp://127.0.0.1" in captured.stderr and "cpu" in captured.stderr
    quiet = run(ip, "x = 1", flags="--quiet")
    assert quiet.stderr == ""


def test_status_lists_workers_and_dashboard(ip):
    with capture_output():
        status = ip.run_line_magic("gpunet", "status")
    text = str(status)
    assert len(status.workers) == 2
    assert "network: embedded" in text
    assert all(w.device["kind"] == "cpu" for w in status.workers)
    assert "http://127.0.0.1:" in text
    assert "free slots" in text and "credits: spent" in text
    assert "providers: local-provider reputation 1.00" in text
    assert all(row[2] == "local-provider" for row in status.rows())


def test_unknown_line_command_gives_usage(ip):
    with pytest.raises(UsageError, match="connect"):
        ip.run_line_magic("gpunet", "conect")


def test_flushed_partial_lines_arrive_while_the_cell_runs(ip, tmp_path):
    body = "print('50%', end='', flush=True)\n" + WAIT_UNTIL_SEEN + "print(' 100%' if seen else ' not shown live')"
    texts = live_stdout(ip, tmp_path, body, first="50%")
    assert texts == "50% 100%\n", "the flushed '50%' should show while the cell still runs"


def test_no_block_failure_is_kept_for_result(ip):
    run(ip, "import time\ntime.sleep(0.2)\nbad = 1 / 0", flags="--no-block --quiet")
    handle = ip.user_ns["_gpunet"]
    with pytest.raises(ZeroDivisionError):
        handle.result(timeout=30)
    assert "bad" not in ip.user_ns


def test_no_block_cancel_says_so(ip, net):
    run(ip, "import time\nfor _ in range(600):\n    time.sleep(0.05)\ndone = 1", flags="--no-block --quiet")
    handle = ip.user_ns["_gpunet"]
    try:
        # Cancel while it runs: once a worker reports it running.
        wait_until(lambda: any(running_jobs(net).values()), 30, "the cell to run on a worker")
        handle.cancel()
        with pytest.raises(Exception, match="cancelled|stopped"):
            handle.result(timeout=30)
    finally:
        if not handle.done():
            handle.cancel()  # a failed test must not leave the shared workers busy


def test_connect_and_disconnect_through_the_magic(ip, net):
    from gpunet.client import network as network_module

    network_module._current = None
    try:
        with capture_output() as captured:
            ip.run_line_magic("gpunet", "connect --workers 1")
        assert "local network" in captured.stdout and "1 CPU workers" in captured.stdout
        own = network_module.current()
        pids = own.client.run(os.getpid)
        with capture_output() as captured:
            ip.run_line_magic("gpunet", "disconnect")
        assert "disconnected" in captured.stdout
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(process_alive(pid) for pid in pids.values()):
            time.sleep(0.1)
        assert not any(process_alive(pid) for pid in pids.values()), "disconnect left worker processes running"
        with capture_output() as captured:
            ip.run_line_magic("gpunet", f"connect {net.address}")
        assert network_module.current().address == net.address
    finally:
        joined = network_module._current
        if joined is not None and joined is not net:  # also the own network, if the test failed early
            joined.close()
        network_module._current = net



def test_connect_to_an_unreachable_scheduler_through_the_magic(ip, net):
    from gpunet.errors import ConnectError

    with pytest.raises(ConnectError, match="127.0.0.1:9"):
        ip.run_line_magic("gpunet", "connect tcp://127.0.0.1:9")
    with pytest.raises(Exception, match="only sizes a local network"):
        ip.run_line_magic("gpunet", f"connect {net.address} --workers 3")


def test_bad_gpu_mem_is_a_usage_error(ip):
    with pytest.raises(UsageError, match="40 gigs"):
        run(ip, "x = 1", flags="--gpu-mem '40 gigs'")


def test_widget_progress_states():
    from gpunet.ui.progress import JobProgress

    with capture_output():
        progress = JobProgress("gpunet", widget=True)
        assert "queued" in progress._html.value
        progress.running("tcp://127.0.0.1:1", "cpu: test")
        assert "running on tcp://127.0.0.1:1 (cpu: test)" in progress._html.value
        progress.finish(ok=True)
    assert "done on tcp://127.0.0.1:1" in progress._html.value


def test_worker_dying_during_a_cell_reruns_it_and_says_so(tmp_path, shell, detached):
    import gpunet

    ip = shell  # with the extension loaded, also when this test runs alone
    ip.user_ns["marker"] = str(tmp_path / "first-attempt")
    with gpunet.connect():
        body = ("import os, time\ntime.sleep(0.5)\n"
                "if not os.path.exists(marker):\n    open(marker, 'w').close()\n    os._exit(1)\nsurvived = True")
        captured = run(ip, body, flags="--timeout 60")
        assert ip.user_ns["survived"] is True
        assert "was lost; re-running" in captured.stderr


def test_a_waiting_cell_says_why(ip, net, tmp_path, monkeypatch):
    from gpunet.ui.progress import JobProgress

    # The blockers hold both devices until the cell has said why it waits (or 60 s),
    # not for a fixed time that a slow machine could spend before it says so.
    release = tmp_path / "release"
    said = JobProgress.waiting

    def waiting(self, reason):
        said(self, reason)
        if "both busy" in reason:
            release.touch()

    monkeypatch.setattr(JobProgress, "waiting", waiting)

    def hold_device(path):
        import os
        import time

        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)

    blockers = net.client.map(hold_device, [str(release)] * 2, pure=False, resources={"device": 1})
    try:
        wait_until(lambda: sum(map(len, net.client.processing().values())) == 2, 60,
                   "both blockers to be on a worker")
        captured = run(ip, "x = 1", flags="--timeout 120")
        assert "waiting for a worker with device=1 (2 such workers, both busy)" in captured.stderr
        assert ip.user_ns["x"] == 1
    finally:
        release.touch()
        net.client.gather(blockers)


CELL_FLAGS = ("--gpus", "--gpu-mem", "--min-tflops", "--in", "--out", "--map", "--verify", "--rtol", "--atol",
              "--max-credits", "--max-rate", "--prefer", "--timeout", "--no-block", "--quiet")


def test_help_in_every_spelling_shows_every_command_and_flag(ip):
    for how in (lambda: ip.run_line_magic("gpunet", "help"),
                lambda: ip.run_cell_magic("gpunet", "--help", "x = 1"),
                lambda: ip.run_cell("%gpunet?"),
                lambda: ip.run_cell("%%gpunet?")):
        with capture_output() as captured:
            how()
        for word in CELL_FLAGS + ("connect", "status", "usage", "disconnect", "--token-file", "--budget"):
            assert word in captured.stdout, (word, captured.stdout)
    assert "x" not in ip.user_ns, "--help runs nothing"


def test_magic_lines_ignore_a_trailing_comment(ip):
    with capture_output():
        status = ip.run_line_magic("gpunet", "status          # workers and devices")
    assert "worker(s)" in str(status)
    run(ip, "w = 2", flags="--quiet   # a comment after the flags")
    assert ip.user_ns["w"] == 2


def test_a_flag_given_twice_is_a_usage_error(ip, sent):
    with pytest.raises(UsageError, match="--map is given twice"):
        run(ip, "y = i", flags="--map i=range(2) --map i=range(3)")
    with pytest.raises(UsageError, match="--quiet is given twice"):
        run(ip, "y = 1", flags="--quiet --quiet")
    assert sent == []


def test_flags_that_mean_nothing_without_verify_are_usage_errors(ip, sent):
    with pytest.raises(UsageError, match="--no-reuse matters only with --verify"):
        run(ip, "y = 1", flags="--no-reuse")
    with pytest.raises(UsageError, match="give --verify too"):
        run(ip, "y = 1", flags="--rtol 1e-3")
    assert sent == [] and "y" not in ip.user_ns


def test_status_shows_the_default_timeout_and_what_it_holds(ip):
    with capture_output():
        status = ip.run_line_magic("gpunet", "status")
    assert "--timeout defaults to 60 s" in str(status) and "holding 60 credits" in str(status)


def test_a_cell_without_timeout_stops_when_its_hold_runs_out(ip, net, monkeypatch):
    from gpunet.metering import meter

    monkeypatch.setattr(meter, "DEFAULT_HOLD_SECONDS", 1.0)  # the default hold, and so the default timeout
    with pytest.raises(CellTimeoutError, match="timeout of 1 s"):
        run(ip, "while True:\n    pass", flags="--quiet")
    wait_until(lambda: all(keys == [] for keys in running_jobs(net).values()), 30, "the stopped cell to leave")


def test_python_connect_inside_the_magic_session_shares_its_network(ip, net):
    import gpunet
    from gpunet.errors import GpunetError

    with gpunet.connect() as shared:
        assert shared is net
        assert shared.run(abs, -3) == 3
    assert gpunet.current() is net and not net.closed, "leaving the block closed the magic's connection"
    run(ip, "v = 3", flags="--quiet")
    assert ip.user_ns["v"] == 3
    with pytest.raises(GpunetError, match="already connected"):
        gpunet.connect("tcp://127.0.0.1:9")
    assert gpunet.current() is net


def test_a_hash_inside_quotes_or_a_word_is_not_a_comment():
    from gpunet.extensions.magics import _tokens

    assert _tokens("--map s=['a','#b']   # the items") == ["--map", "s=['a','#b']"]
    assert _tokens("--map x=a#b") == ["--map", "x=a#b"]
    assert _tokens("status# not a comment either") == ["status#", "not", "a", "comment", "either"]


def test_connect_reads_the_token_from_a_file(ip, net, tmp_path):
    """The token stays out of the notebook: --token-file F, with a clear error for a bad file."""
    from gpunet.client import network as network_module

    token_file = tmp_path / "token"
    token_file.write_text(net.embedded.client_token + "\n")
    with pytest.raises(UsageError, match="cannot read the token file"):
        ip.run_line_magic("gpunet", f"connect {net.address} --credits {net.credits.url} --token-file {tmp_path}/none")
    with pytest.raises(UsageError, match="one of --token and --token-file"):
        ip.run_line_magic("gpunet", f"connect {net.address} --credits {net.credits.url} --token t --token-file x")
    network_module._current = None
    try:
        with capture_output() as captured:
            ip.run_line_magic("gpunet", f"connect {net.address} --credits {net.credits.url} --token-file {token_file}")
        assert f"at {net.credits.url}" in captured.stdout
        assert network_module.current().credits.token == net.embedded.client_token
    finally:
        joined = network_module._current
        if joined is not None and joined is not net:
            joined.close()
        network_module._current = net
