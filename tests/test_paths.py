"""The tests write only into their temp dirs: gpunet's data dir is one of them."""

from __future__ import annotations

import os
from pathlib import Path

from gpunet.paths import DATA_DIR_ENV, data_dir


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path


def test_the_embedded_network_writes_into_the_data_dir(net, pytestconfig):
    run_dir = net.embedded.credits_dir
    assert run_dir.is_relative_to(Path(pytestconfig.gpunet_data_dir) / "embedded")
    assert (run_dir / "credits.sqlite3").exists()


def test_the_suite_runs_with_a_temporary_data_dir(pytestconfig):
    assert os.environ[DATA_DIR_ENV] == pytestconfig.gpunet_data_dir
    assert data_dir() == Path(pytestconfig.gpunet_data_dir)


def test_a_scratch_data_dir_holds_what_is_written_meanwhile_and_is_gone_after(monkeypatch):
    from gpunet.paths import scratch_data_dir

    monkeypatch.setenv(DATA_DIR_ENV, "/where/the/user/keeps/it")
    with scratch_data_dir() as folder:
        assert data_dir() == folder
        (data_dir() / "embedded").mkdir()
    assert not folder.exists()
    assert data_dir() == Path("/where/the/user/keeps/it")
