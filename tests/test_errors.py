"""The exception tree: one base, and IPython shows remote tracebacks, not ours."""

from __future__ import annotations

import gpunet.errors as errors


def test_every_error_derives_from_gpunet_error():
    classes = [obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, BaseException)]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, errors.GpunetError), cls


def test_remote_cell_error_renders_the_remote_traceback():
    tb = 'Traceback (most recent call last):\n  File "<gpunet cell>", line 3, in <module>\nKeyError: 1\n'
    err = errors.RemoteCellError("KeyError", "1", tb)
    assert err._render_traceback_()[-1] == "KeyError: 1"
    assert "line 3" in str(err)
