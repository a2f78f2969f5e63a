"""The sandbox's settings, environment and bubblewrap command line, as data (no process
starts here; tests/test_sandbox.py runs the attacks against real ones)."""

from __future__ import annotations

import argparse
import os

from pathlib import Path

import pytest

from gpunet.cli import network as network_cli
from gpunet.errors import GpunetError, OptionError
from gpunet.worker import sandbox
from gpunet.worker.cgroups import SandboxCgroup, cgroup_home
from gpunet.worker.sandbox import BUBBLEWRAP, PROCESS, SandboxSettings


def test_settings_travel_through_the_environment_and_a_bad_value_says_what_to_do():
    settings = SandboxSettings(isolation=BUBBLEWRAP, allow_network=True, memory_bytes=2**30,
                               hidden_paths=("/srv/token",), path_prefix=("/opt/env/site-packages",))
    assert SandboxSettings.from_env(settings.to_env()) == settings
    with pytest.raises(GpunetError, match="unset it to run jobs in the worker's own process"):
        SandboxSettings.from_env("{not json")
    with pytest.raises(GpunetError, match="isolation must be 'bubblewrap' or 'process'"):
        SandboxSettings.from_env('{"isolation": "chroot"}')


@pytest.mark.skipif(cgroup_home() is None, reason="no cgroup can be made here (neither cgroup v2 with memory and "
                    "pids delegated to this process's cgroup nor writable cgroup v1 memory and pids hierarchies)")
def test_a_sandbox_cgroup_has_its_limits_and_goes_entirely():
    home = cgroup_home()
    made = SandboxCgroup(home, f"gpunet-test-{os.getpid()}", 96 * 2**20, 33)
    try:
        memory_file = "memory.max" if home.version == "v2" else "memory.limit_in_bytes"
        assert (home.memory / made.memory_folder.name / memory_file).read_text().strip() == str(96 * 2**20)
        assert (home.pids / made.memory_folder.name / "pids.max").read_text().strip() == "33"
        assert not made.killed_for_memory()
    finally:
        made.remove()
    assert made.folders and not any(folder.exists() for folder in made.folders)


def test_the_provider_is_told_which_isolation_it_has():
    assert "bubblewrap (read-only system" in SandboxSettings(isolation=BUBBLEWRAP).describe()
    assert "network allowed" in SandboxSettings(isolation=BUBBLEWRAP, allow_network=True).describe()
    assert "apt-get install bubblewrap" in SandboxSettings(isolation=PROCESS).describe()


def test_the_environment_keeps_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUNET_PROVIDER_TOKEN", "secret-1")
    monkeypatch.setenv("GPUNET_TOKEN", "secret-2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-3")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    env = sandbox.scrubbed_environment(str(tmp_path), {"CUDA_VISIBLE_DEVICES": "2"})
    assert not any("secret" in value for value in env.values()), env
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == env["TMPDIR"] == str(tmp_path)
    assert env["CUDA_VISIBLE_DEVICES"] == "2"


def test_a_worker_shows_its_sandbox_only_its_own_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,0,1,2")  # dask-cuda's rotation: this worker's GPU first
    assert sandbox.device_environment() == {"CUDA_VISIBLE_DEVICES": "3"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sandbox.device_environment() == {}
    assert sandbox.gpu_device_nodes(None) == [] and sandbox.gpu_device_nodes("GPU-uuid") == []


def test_bubblewrap_hides_the_home_and_the_token_and_shows_python_again(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / "venv").mkdir(parents=True)
    token = tmp_path / "elsewhere" / "token"
    token.parent.mkdir()
    token.write_text("x")
    monkeypatch.setenv("HOME", str(home))
    settings = SandboxSettings(isolation=BUBBLEWRAP, hidden_paths=(str(token),), path_prefix=(str(home / "venv"),))
    arguments = sandbox.bubblewrap_arguments(settings, str(tmp_path / "scratch"), "/usr/bin/python3", {})
    text = " ".join(arguments)
    assert f"--tmpfs {home}" in text and "--unshare-net" in text and "--unshare-pid" in text
    assert f"--ro-bind /dev/null {token}" in text
    assert f"--ro-bind {home / 'venv'} {home / 'venv'}" in text  # a sys.path entry under the home, read-only
    assert f"--bind {tmp_path / 'scratch'}" in text
    assert "--unshare-net" not in sandbox.bubblewrap_arguments(
        SandboxSettings(isolation=BUBBLEWRAP, allow_network=True), str(tmp_path), "/usr/bin/python3", {})


def test_a_python_under_tmp_is_seen_again_inside_the_private_tmp(tmp_path):
    """A checkout's .venv under /tmp (as CI's clean clone may be) stays visible, read-only,
    under the sandbox's private /tmp: else the sandbox has no Python to start."""
    venv = tmp_path / "venv"  # pytest's tmp_path lies under /tmp
    venv.mkdir()
    if not str(venv.resolve()).startswith("/tmp/"):
        pytest.skip("pytest's temporary folder is not under /tmp here (TMPDIR is set)")
    settings = SandboxSettings(isolation=BUBBLEWRAP, path_prefix=(str(venv),))
    text = " ".join(sandbox.bubblewrap_arguments(settings, str(tmp_path / "scratch"), "/usr/bin/python3", {}))
    assert f"--ro-bind {venv} {venv}" in text
    assert text.index("--tmpfs /tmp") < text.index(f"--ro-bind {venv}")


@pytest.mark.parametrize("flag, value, message", [
    ("sandbox_memory", "lots", "--sandbox-memory: cannot read 'lots' as a size"),
    ("sandbox_processes", 0, "--sandbox-processes must be a positive number"),
    ("sandbox_idle", -1.0, "--sandbox-idle must be a positive number"),
])
def test_bad_sandbox_flags_are_refused_clearly(flag, value, message):
    args = argparse.Namespace(sandbox_memory=None, sandbox_processes=512, sandbox_file_size="4GiB",
                              sandbox_cpu_seconds=3600, sandbox_idle=600.0, allow_network=False, token_file=None,
                              tls_key=None)
    setattr(args, flag, value)
    with pytest.raises(OptionError, match=message):
        network_cli._sandbox_settings(args)


def test_the_sandbox_settings_hide_the_token_file_and_key(tmp_path):
    args = argparse.Namespace(sandbox_memory="1GiB", sandbox_processes=64, sandbox_file_size="1MiB",
                              sandbox_cpu_seconds=60, sandbox_idle=5.0, allow_network=True,
                              token_file=str(tmp_path / "token"), tls_key=None)
    settings = network_cli._sandbox_settings(args)
    assert settings.hidden_paths == (os.path.abspath(tmp_path / "token"),)
    assert settings.memory_bytes == 2**30 and settings.file_bytes == 2**20 and settings.allow_network
