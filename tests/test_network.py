"""The Python API and the connection lifecycle, against real local Dask networks."""

from __future__ import annotations

import os
import socket
import time

import pytest

import gpunet
from gpunet.client import network as network_module
from gpunet.errors import ConnectError, GpunetError, RemoteCellError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_and_map(net):
    assert net.run(pow, 2, 10) == 1024
    assert net.map(lambda v: v * v, range(6)) == [0, 1, 4, 9, 16, 25]


def test_a_maps_finished_items_are_fetched_while_the_rest_run(net, monkeypatch):
    from gpunet.client.submit import RemoteJob

    fetched_early = []
    fetch_early = RemoteJob._fetch_early

    def counted(self):
        fetch_early(self)
        fetched_early.append(len(self.results))

    monkeypatch.setattr(RemoteJob, "EARLY_FETCH_ITEMS", 2)
    monkeypatch.setattr(RemoteJob, "_fetch_early", counted)
    slow_after_four = lambda v: (time.sleep(0.3) if v >= 4 else None) or v * v  # noqa: E731
    assert net.map(slow_after_four, range(10)) == [v * v for v in range(10)]
    assert fetched_early and max(fetched_early) >= 2  # fetched before the last items finished


def test_a_large_map_runs_in_chunks_in_order_each_item_with_its_own_error(net, monkeypatch):
    from gpunet.client.submit import RemoteJob

    sent = []
    submit = RemoteJob.submit.__func__

    def counted(cls, *args, **kwargs):
        remote = submit(cls, *args, **kwargs)
        sent.append((remote.count, remote.tasks))
        return remote

    monkeypatch.setattr(RemoteJob, "submit", classmethod(counted))
    assert net.map(lambda v: v * v, range(600)) == [v * v for v in range(600)]
    assert sent[-1][0] == 600 and sent[-1][1] < 600  # several items a task

    def fails_at_123(v):
        if v == 123:
            raise ValueError(f"no {v}")
        return v

    with pytest.raises(ValueError, match="no 123") as caught:
        net.map(fails_at_123, range(600))
    assert "item 123" in "\n".join(caught.value._render_traceback_())


def test_gpunet_map_uses_the_current_network(net):
    network_module._current = net
    assert gpunet.current() is net
    assert gpunet.map(str, [1, 2]) == ["1", "2"]


def test_run_raises_the_remote_exception(net):
    def fails(key):
        return {}[key]

    with pytest.raises(KeyError) as caught:
        net.run(fails, "missing")
    assert "in fails" in "\n".join(caught.value._render_traceback_())


def test_unbuildable_remote_exception_becomes_remote_cell_error(net):
    def fails():
        class TwoArguments(Exception):  # unpickling calls TwoArguments("x") and fails
            def __init__(self, first, second):
                super().__init__(first)

        raise TwoArguments("made on the worker", 2)

    with pytest.raises(RemoteCellError) as caught:
        net.run(fails)
    assert caught.value.ename == "TwoArguments"
    assert "made on the worker" in str(caught.value) and "in fails" in caught.value.remote_traceback


def test_function_stdout_is_printed_here(net, capsys):
    net.run(print, "from the worker")
    assert "from the worker" in capsys.readouterr().out


def test_unreachable_scheduler_fails_fast_naming_it():
    address = f"tcp://127.0.0.1:{_free_port()}"
    previous = network_module._current
    started = time.monotonic()
    with pytest.raises(ConnectError) as caught:
        gpunet.connect(address, timeout=2, replace=True)  # as %gpunet connect ADDRESS does
    assert address in str(caught.value)
    assert "within 2 s" in str(caught.value), "the timeout given is the one used"
    # Fast: well under Dask's own 30 s connect timeout (distributed.comm.timeouts.connect),
    # which is what it would wait if the timeout were not passed on; 15 s leaves room
    # for a loaded machine.
    assert time.monotonic() - started < 15
    assert network_module._current is previous


def test_scheduler_from_environment(net, monkeypatch, detached):
    monkeypatch.setenv("GPUNET_SCHEDULER", net.address)
    joined = gpunet.connect()
    assert joined.embedded is None and joined.address == net.address
    assert joined.run(len, "abc") == 3
    joined.close()
    assert net.run(len, "ab") == 2, "closing a joined connection leaves the network running"


def test_embedded_network_context_manager_shuts_down(detached):
    with gpunet.connect(workers=1) as own:
        address = own.address
        assert own.run(os.getpid) != os.getpid()
        assert "127.0.0.1" in own.dashboard_link
    with pytest.raises(GpunetError):
        gpunet.current()
    with pytest.raises(ConnectError):
        gpunet.connect(address, timeout=1)


def test_worker_dying_mid_cell_reruns_elsewhere(tmp_path, detached):
    """The first attempt kills its own worker process; Dask re-runs the cell."""
    marker = tmp_path / "first-attempt"

    def dies_once(path):
        if not os.path.exists(path):
            open(path, "w").close()
            os._exit(1)
        return os.getpid()

    with gpunet.connect() as own:
        pid = own.run(dies_once, str(marker), timeout=60)
        assert marker.exists() and isinstance(pid, int)


def test_worker_that_always_dies_gives_a_clear_error(detached):
    with gpunet.connect(workers=1) as own:
        own.client.run_on_scheduler(_lower_allowed_failures)
        with pytest.raises(gpunet.WorkerLostError, match="died"):
            own.run(os._exit, 1, timeout=60)


def _lower_allowed_failures(dask_scheduler=None):
    dask_scheduler.allowed_failures = 0


def test_capability_split_and_pinned_placement(net):
    capabilities = net.capabilities()
    assert len(capabilities) == 2
    assert all(cap["tflops_f32"] > 0 and cap["bandwidth_gbs"] > 0 for cap in capabilities.values())
    sizes = gpunet.split(1001, net)
    assert len(sizes) == 2 and sum(sizes) == 1001 and min(sizes) > 0
    pids = net.map(lambda _: os.getpid(), range(4), placement="capability")
    assert pids[0] == pids[2] and pids[1] == pids[3] and pids[0] != pids[1]


def test_min_tflops_no_worker_offers_fails_naming_the_best(net):
    with pytest.raises(gpunet.PlacementError, match="TFLOP/s"):
        net.run(len, "x", min_tflops=1e6)
    assert net.run(len, "xy", min_tflops=1e-6) == 2
