"""`gpunet up` and `gpunet scheduler` as a user runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import os
import stat
import subprocess
import sys


import gpunet
from gpunet_processes import GPUNET, expect, start, stop



def test_up_serves_a_network_and_stops_on_ctrl_c(detached):
    process = start(["up", "--port", "0", "--dashboard-port", "0"])
    try:
        address = expect(process, r"scheduler: (tcp://127\.0\.0\.1:\d+)").group(1)
        expect(process, r"dashboard: http://127\.0\.0\.1:\d+")
        token_file = expect(process, r"notebook token file: (\S+)").group(1)
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        connect_line = expect(process, r"connect from a notebook with:  (.*)").group(1)
        assert f"--token-file {token_file}" in connect_line and "--token " not in connect_line
        with gpunet.connect(address) as net:
            assert net.map(abs, [-1, -2]) == [1, 2]
            devices = [w.device["kind"] for w in net.workers()]
            assert devices == ["cpu", "cpu"]
    finally:
        out = stop(process)
    assert process.returncode == 0, out
    assert "stopped" in out


def test_scheduler_accepts_workers_with_the_gpunet_preload(tmp_path, detached):
    process = start(["scheduler", "--private", "--port", "0", "--dashboard-port", "0"])
    worker = None
    try:
        address = expect(process, r"scheduler: (tcp://127\.0\.0\.1:\d+)").group(1)
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
             "--resources", "device=1", "--preload", "gpunet.extensions.worker_plugin",
             "--host", "127.0.0.1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with gpunet.connect(address) as net:
            net.client.wait_for_workers(1, timeout=60)
            assert net.run(sum, [1, 2, 3]) == 6
            assert net.workers()[0].device["kind"] == "cpu"
    finally:
        try:
            if worker is not None:
                worker.terminate()
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait(timeout=30)
        finally:
            out = stop(process)
    assert process.returncode == 0, out


def test_unknown_verb_and_help():
    result = subprocess.run(GPUNET + ["frobnicate"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = subprocess.run(GPUNET + ["--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "up" in result.stdout


def test_up_on_a_busy_port_says_which_and_what_to_do():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(GPUNET + ["up", "--port", str(port), "--dashboard-port", "0"],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"127.0.0.1:{port}" in result.stderr and "--port 0" in result.stderr
