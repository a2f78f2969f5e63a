"""What a cell can send its worker over its sandbox's channel (a real sandbox process,
no network): the worker holds no more of it than the sandbox could have built."""

from __future__ import annotations

import uuid

import pytest

from gpunet import codec
from gpunet.wire import CODEC, PICKLE, Job, result_from_event
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
