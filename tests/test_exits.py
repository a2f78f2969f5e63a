"""Leaving without closing: scripts and shells that exit with a network open, a
script that starts a network without a __main__ guard, a credit service whose parent
died, and the folders embedded networks leave behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from gpunet.client.local import KEEP_EMBEDDED_RUNS, prune_embedded_runs
from network_probes import EXIT_NOISE, process_alive, wait_until




def _script(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ, GPUNET_DATA_DIR=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)


def test_a_script_without_a_main_guard_is_named_before_anything_starts(tmp_path):
    result = _script(tmp_path, """\
        import gpunet

        net = gpunet.connect()
        print(net.run(abs, -1))
    """)
    assert result.returncode == 1
    assert "script.py, line 3" in result.stderr and 'if __name__ == "__main__":' in result.stderr, result.stderr
    assert not (tmp_path / "data" / "embedded").exists(), "refused before any network started"
    through_a_function = _script(tmp_path, """\
        import gpunet

        def main():
            with gpunet.connect() as net:
                print(net.run(abs, -1))

        main()
    """)
    assert through_a_function.returncode == 1 and "script.py, line 7" in through_a_function.stderr, \
        through_a_function.stderr


def test_a_script_that_exits_without_closing_is_quiet_and_leaves_no_process(tmp_path):
    result = _script(tmp_path, """\
        import json, os
        import gpunet

        if __name__ == "__main__":
            net = gpunet.connect()
            print(net.run(abs, -7))
            with open("pids.json", "w") as out:
                json.dump({"credits": net.embedded.credits_service.pid,
                           "workers": list(net.client.run(os.getpid).values())}, out)
            # no net.close(): the interpreter's exit closes it
    """)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and result.stdout.strip() == "7", output
    assert not [word for word in EXIT_NOISE if word in output], output
    pids = json.loads((tmp_path / "pids.json").read_text())
    wait_until(lambda: not any(process_alive(pid) for pid in [pids["credits"], *pids["workers"]]), 30,
               "the credit service and the workers to end with the script")


def test_the_credit_service_stops_when_the_process_that_started_it_dies(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import time
            from gpunet.credits import serve_in_background
            service = serve_in_background({str(tmp_path / 'c.sqlite3')!r})
            print(service.pid, flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE, text=True)
    try:
        service_pid = int(parent.stdout.readline())
        assert process_alive(service_pid)
    finally:
        parent.send_signal(signal.SIGKILL)  # no chance to stop its child
        parent.wait(timeout=30)
    wait_until(lambda: not process_alive(service_pid), 30, "the orphaned credit service to stop")


def test_only_the_newest_ended_embedded_runs_are_kept(tmp_path):
    dead = 2 ** 22 + 1  # above Linux's pid_max: never a live process
    runs = [tmp_path / f"20261130-1200{index:02d}-{dead}-0" for index in range(KEEP_EMBEDDED_RUNS + 3)]
    live = tmp_path / f"20261130-110000-{os.getpid()}-0"  # older, but its process still runs
    for run in [*runs, live]:
        run.mkdir()
        (run / "credits.log").write_text("x")
    removed = prune_embedded_runs(tmp_path)
    assert removed == runs[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r.name for r in [live, *runs[3:]])
