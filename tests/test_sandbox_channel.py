"""A real SandboxPool's sandbox processes (no network): what a cell can send its worker
over its sandbox's channel (no more than the sandbox could have built), and the
processes it detaches (they end with the cell, or with the sandbox)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psutil

import pytest

from gpunet import codec
from gpunet.wire import CODEC, PICKLE, Job, pickle_value, result_from_event, session_digest, unpickle_value
from gpunet.worker.sandbox import BUBBLEWRAP, PROCESS, SandboxPool, SandboxSettings, bubblewrap_works

MEMORY_BYTES = 32 * 2**20

# A cell that writes on its sandbox's channel, as the runner would, a result frame
# twice the sandbox's memory limit, built a MiB at a time.
FORGED_RESULT = f"""
import struct, sys, msgpack
frame = sys._getframe()
while 'key' not in frame.f_locals:
    frame = frame.f_back
key, channel = frame.f_locals['key'], frame.f_locals['channel']
with channel.send_lock:
    head = msgpack.packb(['result', key, 'fields'])
    channel.sock.sendall(struct.pack('>I', len(head)) + head + struct.pack('>I', {2 * MEMORY_BYTES}))
    for _ in range({2 * MEMORY_BYTES // 2**20}):
        channel.sock.sendall(bytes(2**20))
"""


@pytest.fixture
def pool():
    isolation = BUBBLEWRAP if bubblewrap_works() else PROCESS
    sandboxes = SandboxPool(SandboxSettings(isolation=isolation, memory_bytes=MEMORY_BYTES, idle_seconds=60))
    try:
        yield sandboxes
    finally:
        sandboxes.close()


@pytest.mark.parametrize("result_format", [PICKLE, CODEC])
def test_a_result_frame_over_the_sandbox_memory_is_refused_unread(pool, result_format):
    # the notebook (the cell's author) sets the job's own cap as high as it likes
    job = Job(job_id=uuid.uuid4().hex, code=FORGED_RESULT, result_format=result_format, session=uuid.uuid4().hex,
              max_result_bytes=2**31)
    result = pool.run(job, None, None, None, "local", "cpu")
    if result_format == CODEC:
        result = result_from_event(codec.decode(result))
    assert result.error["ename"] == "SandboxEnded", result.error
    assert f"over {MEMORY_BYTES:,}" in result.error["evalue"], result.error
    # the worker serves the next session unharmed
    after = pool.run(Job(job_id=uuid.uuid4().hex, code="x = 1", outputs=("x",), session=uuid.uuid4().hex),
                     None, None, None, "local", "cpu")
    assert after.error is None and after.outputs


# A cell that detaches a process from its sandbox's tree (fork, setsid, fork) and
# returns its pid; the cell keeps running for `linger` seconds when told.
DETACHING = """
import os, subprocess, time
reader, writer = os.pipe()
if os.fork() == 0:
    os.setsid()
    os.write(writer, str(subprocess.Popen(['sleep', '600'], start_new_session=True).pid).encode())
    os._exit(0)
os.wait()
stray = int(os.read(reader, 32))
time.sleep(linger)
"""


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def process_pool():
    return SandboxPool(SandboxSettings(isolation=PROCESS, memory_bytes=MEMORY_BYTES, idle_seconds=60))


def test_a_process_a_cell_detaches_ends_with_the_cell():
    pool = process_pool()
    try:
        job = Job(job_id=uuid.uuid4().hex, code=DETACHING, outputs=("stray",), inputs={"linger": pickle_value(0)},
                  session=uuid.uuid4().hex)
        result = pool.run(job, None, None, None, "local", "cpu")
        assert result.error is None, result.error
        stray = unpickle_value(result.outputs["stray"])
        assert gone_within(stray, 30), f"process {stray}, detached by a cell, outlived it"
    finally:
        pool.close()


def test_a_process_a_cell_detaches_ends_with_its_sandbox():
    pool = process_pool()
    background = ThreadPoolExecutor(1)
    session = uuid.uuid4().hex
    try:
        job = Job(job_id=uuid.uuid4().hex, code=DETACHING, session=session, inputs={"linger": pickle_value(600)})
        running = background.submit(pool.run, job, None, None, None, "local", "cpu")
        deadline = time.monotonic() + 60
        sandbox = None
        while time.monotonic() < deadline and sandbox is None:
            sandbox = pool.sessions.get(session_digest(session))
            time.sleep(0.05)
        assert sandbox is not None and sandbox.ready.wait(60)
        strays: list[int] = []
        while time.monotonic() < deadline and not strays:
            strays = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "600"]
                      and sandbox.process.pid in [a.pid for a in p.parents()]]
            time.sleep(0.05)
        assert strays, "the cell's detached process is not the sandbox's descendant"
        pool.end_session(session_digest(session))
        assert running.result(timeout=60).error["ename"] == "SandboxEnded"
        assert all(gone_within(pid, 30) for pid in strays), f"processes {strays} outlived their sandbox"
    finally:
        pool.close()
        background.shutdown(wait=False)


def test_a_codec_result_leaves_the_sandbox_in_frames_its_array_unjoined():
    isolation = BUBBLEWRAP if bubblewrap_works() else PROCESS
    sandboxes = SandboxPool(SandboxSettings(isolation=isolation, memory_bytes=1024 * 2**20, idle_seconds=60))
    try:
        job = Job(job_id=uuid.uuid4().hex, code="import numpy as np\nx = np.arange(250_000.0)", outputs=("x",),
                  result_format=CODEC, session=uuid.uuid4().hex)
        result = sandboxes.run(job, None, None, None, "local", "cpu")
        assert isinstance(result, codec.Frames) and 2_000_000 in [memoryview(f).nbytes for f in result]
        back = result_from_event(codec.decode(result))
        assert back.error is None, back.error
        assert codec.load(back.outputs["x"], CODEC, what="output 'x'").sum() == sum(range(250_000))
    finally:
        sandboxes.close()


def forged_header(message: list) -> str:
    """A cell that writes ``message`` (a result's header, with no frames after it) on its
    sandbox's channel, as the runner would."""
    return f"""
import struct, sys, msgpack
frame = sys._getframe()
while 'key' not in frame.f_locals:
    frame = frame.f_back
key, channel = frame.f_locals['key'], frame.f_locals['channel']
with channel.send_lock:
    head = msgpack.packb([{message[0]!r}, key, *{message[1:]!r}])
    channel.sock.sendall(struct.pack('>I', len(head)) + head)
"""


# A cell that says, on its sandbox's channel, that its result comes in more frames than any may.
FORGED_FRAME_COUNT = forged_header(["result", "codec", 10**9])


def test_a_result_in_more_frames_than_allowed_is_refused(pool):
    job = Job(job_id=uuid.uuid4().hex, code=FORGED_FRAME_COUNT, result_format=CODEC, session=uuid.uuid4().hex)
    result = result_from_event(codec.decode(pool.run(job, None, None, None, "local", "cpu")))
    assert result.error["ename"] == "SandboxEnded" and "1000000000 frames" in result.error["evalue"], result.error


def test_cells_that_alternate_between_environments_switch_warm_sandboxes(pool, tmp_path):
    from gpunet.worker.environment import PreparedEnvironment
    from gpunet.worker.sandbox import SANDBOXES_PER_SESSION

    def environment(name):
        site = tmp_path / name / "site-packages"
        site.mkdir(parents=True)
        (site / f"gpunet_probe_{name}.py").write_text(f"WHERE = {name!r}\n")
        return PreparedEnvironment(tmp_path / name, tmp_path / name / "bin" / "python", site, {}, {})

    session = uuid.uuid4().hex
    prepared = {name: environment(name) for name in "acd"}

    def cells_here(name):
        """How many cells ran in the sandbox this one ran in (a count kept in that process)."""
        imports = "" if name == "base" else f"import gpunet_probe_{name} as probe\nassert probe.WHERE == {name!r}\n"
        code = imports + "import builtins\nbuiltins.cells = getattr(builtins, 'cells', 0) + 1\nn = builtins.cells\n"
        job = Job(job_id=uuid.uuid4().hex, code=code, outputs=("n",), session=session)
        result = pool.run(job, None, None, None, "local", "cpu", prepared.get(name), {"kind": name})
        assert result.error is None, result.error
        return unpickle_value(result.outputs["n"])

    assert [cells_here(name) for name in ["a", "base", "a", "base", "a"]] == [1, 1, 2, 2, 3]
    assert [cells_here(name) for name in ["c", "d"]] == [1, 1]  # a third and a fourth environment
    kept = 1 + len(pool.others[session_digest(session)])
    assert kept == SANDBOXES_PER_SESSION
    assert cells_here("base") == 1  # the least recently used was ended: a fresh sandbox
    assert cells_here("d") == 2
    pool.end_session(session_digest(session))
    assert session_digest(session) not in pool.others and not pool.in_use


def test_a_chunk_runs_in_its_sandbox_in_one_request_each_item_with_its_own_result(pool):
    """A map chunk's items go to the sandbox as one request and come back as one answer:
    each with its own index, output text, error and time; a CODEC chunk ends before its
    results pass the job's cap (the rest are not run, for the notebook to send again)."""
    job = Job(job_id=uuid.uuid4().hex, code="print('item', i)\ny = 10 // i", outputs=("y",), map_name="i",
              session=uuid.uuid4().hex)
    results = pool.run_chunk(job, [pickle_value(i) for i in (2, 0, 5)], 7, None, "local", "cpu")
    assert [result.index for result in results] == [7, 8, 9]
    assert results[1].error["ename"] == "ZeroDivisionError" and results[0].error is results[2].error is None
    assert [unpickle_value(results[k].outputs["y"]) for k in (0, 2)] == [5, 2]
    assert [result.streams[0][2] for result in results] == ["item 2\n", "item 0\n", "item 5\n"]
    assert all(result.finished >= result.started > 0 for result in results)
    capped = Job(job_id=uuid.uuid4().hex, code="y = bytes(n)", outputs=("y",), map_name="n", result_format=CODEC,
                 session=job.session, max_result_bytes=10_000)
    frames = pool.run_chunk(capped, [pickle_value(4000)] * 5, 0, None, "local", "cpu")
    assert [result_from_event(codec.decode(f)).index for f in frames] == [0, 1]


# A cell that answers, on its sandbox's channel, for more items than its chunk was given.
FORGED_CHUNK = forged_header(["results", "codec", [1] * 5])


def test_a_chunk_answered_for_more_items_than_it_was_given_is_refused(pool):
    job = Job(job_id=uuid.uuid4().hex, code=FORGED_CHUNK, map_name="i", result_format=CODEC,
              session=uuid.uuid4().hex)
    results = pool.run_chunk(job, [pickle_value(i) for i in range(3)], 0, None, "local", "cpu")
    assert len(results) == 1  # the first item's error; the rest go again
    result = result_from_event(codec.decode(results[0]))
    assert result.error["ename"] == "SandboxEnded" and "[1, 1, 1, 1, 1] frames" in result.error["evalue"]
