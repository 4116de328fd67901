"""The environment each launcher starts its server with: what the models read as settings.

TorchServe's workers and Triton's backend stubs run in directories of their own, not where
the launcher was started, so a relative path in a path setting named nothing there."""

from __future__ import annotations

import os

import pytest

from sdxl_serve.server import TorchServeProcess
from sdxl_serve.settings import PATH_SETTINGS
from sdxl_serve.triton_server import TritonServerProcess

pytestmark = pytest.mark.unit

LAUNCHERS = {
    "torchserve": lambda where, env=None: TorchServeProcess(where / "run", where / "store",
                                                            env=env),
    "triton": lambda where, env=None: TritonServerProcess(where / "run", env=env),
}
VARIABLES = ["SDXL_" + name.upper() for name in PATH_SETTINGS]


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("variable", VARIABLES)
def test_a_relative_path_setting_names_the_same_place_for_the_server(tmp_path, monkeypatch,
                                                                     launcher, variable):
    # `SDXL_MODEL_DIR=build/tiny-sdxl make serve` (or serve-triton): the launcher's checks
    # found the weights from the checkout, then the model failed its load where the server
    # runs ("model_dir 'build/tiny-sdxl' is not a directory").
    (tmp_path / "build" / "tiny-sdxl").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "build/tiny-sdxl")
    assert LAUNCHERS[launcher](tmp_path).env[variable] == str(tmp_path / "build" / "tiny-sdxl")
    # Given to the launcher itself, the same.
    server = LAUNCHERS[launcher](tmp_path, {variable: "build/./tiny-sdxl"})
    assert server.env[variable] == str(tmp_path / "build" / "tiny-sdxl")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_absolute_and_empty_path_settings_are_passed_as_given(tmp_path, monkeypatch, launcher):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDXL_MODEL_DIR", "/models/sdxl-base-1.0")
    monkeypatch.setenv("SDXL_VAE_DIR", "")  # empty: the setting's default, not the cwd
    env = LAUNCHERS[launcher](tmp_path).env
    assert env["SDXL_MODEL_DIR"] == "/models/sdxl-base-1.0"
    assert env["SDXL_VAE_DIR"] == ""
    assert os.environ["SDXL_VAE_DIR"] == ""


def test_every_setting_that_names_a_path_is_listed():
    import dataclasses

    from sdxl_serve.settings import Settings

    named = {field.name for field in dataclasses.fields(Settings)
             if field.name.endswith(("_dir", "_file"))}
    assert named == set(PATH_SETTINGS)


def test_two_servers_given_one_tmpdir_each_get_a_temp_directory_of_their_own(tmp_path,
                                                                             monkeypatch):
    # TorchServe keeps its pid file and its workers' sockets (.ts.sock.9000) in its temp
    # directory: `make serve` took a TMPDIR given as that directory itself, so a second
    # server on other ports, given the same TMPDIR, shared them with the first.
    from serve import torchserve_process

    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    made = {}
    for port in (8080, 9080):
        for name, offset in (("INFERENCE", 0), ("MANAGEMENT", 1), ("METRICS", 2)):
            monkeypatch.setenv(f"TS_{name}_ADDRESS", f"http://127.0.0.1:{port + offset}")
        server = torchserve_process("sdxl", tmp_path / "sdxl-1.0.mar", tmp_path,
                                    runs=tmp_path / "runs")
        made[port] = server.tmp_dir
        assert server.env["TMPDIR"] == server.env["TEMP"] == str(server.tmp_dir)
        assert server.owns_tmp_dir  # a killed server's leftovers there: removed at the start
    assert made == {port: tmp_path / "scratch" / f"sdxl-torchserve-{port}"
                    for port in (8080, 9080)}
    # Without TMPDIR, the run directory's own, as before.
    monkeypatch.delenv("TMPDIR")
    assert torchserve_process("sdxl", tmp_path / "sdxl-1.0.mar", tmp_path,
                              runs=tmp_path / "runs").tmp_dir == tmp_path / "runs" / "9080" / "tmp"


def test_the_temp_directory_made_in_a_tmpdir_given_is_the_owners_alone(tmp_path, monkeypatch):
    """`sdxl-torchserve-<port>` was made 0755 under the usual umask (one made by an older
    start stayed so), where the run directory is 0700: any local user could list the
    workers' sockets, the unpacked archives and the engine processes' pids."""
    from serve import torchserve_process
    from sdxl_serve.server import ServerError

    monkeypatch.setenv("TMPDIR", str(tmp_path / "scratch"))
    for name, port in (("INFERENCE", 9300), ("MANAGEMENT", 9301), ("METRICS", 9302)):
        monkeypatch.setenv(f"TS_{name}_ADDRESS", f"http://127.0.0.1:{port}")
    # A start that makes its folders and then finds no Java: no server runs.
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    server = torchserve_process("sdxl", tmp_path / "sdxl-1.0.mar", tmp_path,
                                runs=tmp_path / "runs")
    before = os.umask(0o022)
    try:
        (tmp_path / "scratch").mkdir()
        (tmp_path / "scratch" / "sdxl-torchserve-9300").mkdir()  # as an older start made it
        with pytest.raises(ServerError, match="has no runnable bin/java"):
            server.start()
    finally:
        os.umask(before)
        server.stop()
    assert server.tmp_dir == tmp_path / "scratch" / "sdxl-torchserve-9300"
    assert oct(server.tmp_dir.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "scratch").stat().st_mode & 0o777) == "0o755"  # the TMPDIR's own
