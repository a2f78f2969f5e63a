"""The notebook side without IPython: run_cell lands a cell's outputs in any dict,
%%gpunet? shows the whole usage, and a cell sent while no worker is connected waits
for one instead of failing."""

from __future__ import annotations

import re
import time

import pytest
from IPython.utils.capture import capture_output

import gpunet
from gpunet.client import placement
from gpunet.errors import CellError, OptionError, PlacementError
from network_probes import ctrl_c_once_it_runs


def test_run_cell_lands_outputs_in_a_plain_dict(net, capsys):
    namespace = {"x": 20, "unused": object()}
    cell = net.run_cell("y = x + 1\nprint('from the worker', y)", namespace, quiet=True)
    assert namespace["y"] == 21 and cell.outputs == {"y": 21}
    assert "from the worker 21" in capsys.readouterr().out


def test_run_cell_maps_and_refuses_bad_options(net):
    namespace = {"scale": 3}
    net.run_cell("value = item * scale", namespace, map="item=range(4)", quiet=True)
    assert namespace["value"] == [0, 3, 6, 9]
    with pytest.raises(OptionError, match="NAME=EXPR"):
        net.run_cell("x = 1", {}, map="range(4)")
    with pytest.raises(OptionError, match="not a Python name"):
        net.run_cell("x = 1", {}, outputs="x, 2y")
    with pytest.raises(CellError, match="--in names missing"):
        net.run_cell("x = missing", {}, inputs=["missing"])
    with pytest.raises(OptionError, match="give --verify too"):
        net.run_cell("x = 1", {}, rtol=1e-3)


def test_cell_magic_help_shows_every_flag(shell):
    with capture_output() as captured:
        shell.run_cell("%%gpunet?")
    text = captured.stdout
    assert "%%gpunet [--gpus N]" in text
    for flag in ("--gpu-mem", "--min-tflops", "--in", "--out", "--map", "--verify", "--rtol", "--atol",
                 "--max-credits", "--timeout", "--no-block", "--quiet", "%gpunet connect"):
        assert flag in text, flag


def test_waiting_reason_with_no_worker_connected():
    reason = placement.waiting_reason({"device": 1}, {}, {})
    assert reason.startswith("waiting for a worker with device=1: no worker is connected now")


def test_a_cell_sent_while_no_worker_is_connected_waits_for_one(detached):
    with gpunet.connect(workers=1, metered=False) as own:
        cluster = own.embedded.cluster
        cluster.scale(0)
        deadline = time.monotonic() + 60
        while own.scheduler_workers(fresh=True) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not own.scheduler_workers(fresh=True), "the worker should have left"
        with pytest.raises(gpunet.CellTimeoutError, match="did not start within its timeout of 1 s .* no worker is "
                                                          "connected now"):
            own.run_cell("z = 1", {}, quiet=True, timeout=1)
        namespace = {"x": 20}
        cell = own.run_cell("y = x + 1", namespace, block=False, quiet=True, timeout=120)
        assert not cell.done()
        cluster.scale(1)
        cell.result(timeout=120)
        assert namespace["y"] == 21


def test_a_cell_no_connected_worker_can_ever_run_fails_at_once(net):
    with pytest.raises(PlacementError, match="no worker has a GPU"):
        net.run_cell("x = 1", {}, gpus=4, quiet=True)


def test_a_bad_flag_is_a_usage_error_even_when_not_connected(shell, detached):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--verify must be"):
        shell.run_cell_magic("gpunet", "--verify sometimes", "x = 1")


def _loop_writing(path: str) -> None:
    """Write to ``path`` until stopped (what Ctrl-C stops)."""
    while True:
        with open(path, "a") as beacon:
            beacon.write(".")
        time.sleep(0.05)


def test_ctrl_c_in_net_run_says_one_line_and_raises_a_bare_interrupt(net, tmp_path, capsys):
    beacon = tmp_path / "beacon"
    with pytest.raises(KeyboardInterrupt) as caught, ctrl_c_once_it_runs(beacon):
        net.run(_loop_writing, str(beacon), timeout=30)  # bounded even if the signal were lost
    assert beacon.exists(), "the function never ran"
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gpunet:")]
    assert len(lines) == 1 and re.fullmatch(r"gpunet: cancelled after \d+\.\d s \(.+\)", lines[0]), lines
    assert caught.value._render_traceback_() == ["KeyboardInterrupt"]
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
