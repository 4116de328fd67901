"""The environment Triton is started with: what its models read as settings.

Triton and its backend stubs run in the server's run directory, not where the launcher was
started, so a relative path in a path setting named nothing there."""

from __future__ import annotations

import os

import pytest

from sdxl_serve.triton_server import TritonServerProcess


@pytest.mark.parametrize("variable", ["SDXL_MODEL_DIR", "SDXL_VAE_DIR",
                                      "SDXL_COMPILE_CACHE_DIR", "SDXL_PROFILE_DIR"])
def test_a_relative_path_setting_names_the_same_place_for_triton(tmp_path, monkeypatch,
                                                                  variable):
    # `SDXL_MODEL_DIR=build/tiny-sdxl make serve-triton`: the launcher's weight check found
    # them from the checkout, then both models failed their load in the run directory
    # ("model_dir 'build/tiny-sdxl' is not a directory") and Triton exited.
    (tmp_path / "build" / "tiny-sdxl").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "build/tiny-sdxl")
    server = TritonServerProcess(tmp_path / "run")
    assert server.env[variable] == str(tmp_path / "build" / "tiny-sdxl")
    # Given to the server itself, the same.
    server = TritonServerProcess(tmp_path / "run", env={variable: "build/./tiny-sdxl"})
    assert server.env[variable] == str(tmp_path / "build" / "tiny-sdxl")


def test_absolute_and_empty_path_settings_are_passed_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDXL_MODEL_DIR", "/models/sdxl-base-1.0")
    monkeypatch.setenv("SDXL_VAE_DIR", "")  # empty: the setting's default, not the cwd
    env = TritonServerProcess(tmp_path / "run").env
    assert env["SDXL_MODEL_DIR"] == "/models/sdxl-base-1.0"
    assert env["SDXL_VAE_DIR"] == ""
    assert os.environ["SDXL_VAE_DIR"] == ""
