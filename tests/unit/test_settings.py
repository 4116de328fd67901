"""Settings are read once, validated, and overridable by SDXL_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_serve.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_environment_overrides_the_model_config():
    settings = Settings.from_mapping({"max_num_images": 2}, env={"SDXL_MAX_NUM_IMAGES": "3"})
    assert settings.max_num_images == 3


def test_unknown_keys_are_kept_for_other_parts():
    assert Settings.from_mapping({"default_steps": 4}, env={}).extra == {"default_steps": 4}


def test_warmup_sizes_parse_from_text_and_lists():
    assert Settings.from_mapping({"warmup_sizes": "64x64, 128x96"}, env={}).warmup_sizes == \
        ((64, 64), (128, 96))
    assert Settings.from_mapping({"warmup_sizes": [[64, 64]]}, env={}).warmup_sizes == \
        ((64, 64),)


@pytest.mark.parametrize("config, words", [
    ({"device": "tpu"}, ["device", "tpu", "cpu"]),
    ({"dtype": "int8"}, ["dtype", "int8"]),
    ({"max_num_images": 0}, ["max_num_images", "0"]),
    ({"max_num_images": "many"}, ["max_num_images", "many"]),
    ({"png_compress_level": True}, ["png_compress_level"]),
    ({"model_dir": "/nonexistent/sdxl"}, ["model_dir", "not a directory"]),
])
def test_bad_settings_fail_fast_naming_the_setting(config, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    for word in words:
        assert word in str(caught.value)


def test_settings_are_frozen():
    settings = Settings.from_mapping({}, env={})
    with pytest.raises(AttributeError):
        settings.device = "cuda"


def test_recycling_budgets_come_from_the_environment():
    settings = Settings.from_mapping(
        {"max_requests_per_worker": 1000, "max_worker_age_s": 3600},
        env={"SDXL_MAX_REQUESTS_PER_WORKER": "5", "SDXL_MAX_WORKER_AGE_S": "90.5"})
    assert (settings.max_requests_per_worker, settings.max_worker_age_s) == (5, 90.5)


def test_runtime_defaults_are_the_production_ones():
    settings = Settings.from_mapping({}, env={})
    assert (settings.max_requests_per_worker, settings.max_worker_age_s) == (1000, 3600.0)
    assert settings.fault_oom_max_pixels == 0  # no fault injection unless asked
    assert settings.fault_engine_broken_file == ""
    assert (settings.circuit_failure_threshold, settings.circuit_cooldown_s) == (3, 30.0)
    assert settings.profile_every_n_requests == 0  # profiling is off unless asked


def test_the_model_config_sets_what_the_defaults_say():
    # config/model-config.yaml documents each setting; its values are the defaults.
    import yaml

    handler = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" /
                              "model-config.yaml").read_text())["handler"]
    configured = Settings.from_mapping(handler, env={})
    for name in ("circuit_failure_threshold", "circuit_cooldown_s",
                 "profile_every_n_requests", "profile_keep", "profile_dir"):
        assert name in handler, name
        assert getattr(configured, name) == getattr(Settings(), name), name


@pytest.mark.parametrize("config, words", [
    ({"max_requests_per_worker": 0}, ["max_requests_per_worker", "0"]),
    ({"max_worker_age_s": "soon"}, ["max_worker_age_s", "soon"]),
    ({"max_worker_age_s": "nan"}, ["max_worker_age_s", "finite"]),
    ({"recycle_jitter": 2}, ["recycle_jitter", "2"]),
    ({"fault_oom_stage": "encode"}, ["fault_oom_stage", "denoise"]),
    ({"circuit_failure_threshold": -1}, ["circuit_failure_threshold", "-1"]),
    ({"circuit_cooldown_s": "later"}, ["circuit_cooldown_s", "later"]),
    ({"profile_every_n_requests": -5}, ["profile_every_n_requests", "-5"]),
    ({"profile_keep": 0}, ["profile_keep", "0"]),
])
def test_bad_runtime_settings_fail_fast(config, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    for word in words:
        assert word in str(caught.value)


def test_the_server_passes_sdxl_settings_to_torchserve(monkeypatch, tmp_path):
    """TorchServe hands its environment to workers, so `make serve` / serve.py only have to
    put the variables in the server's environment."""
    from sdxl_serve.server import TorchServeProcess

    monkeypatch.setenv("SDXL_MAX_REQUESTS_PER_WORKER", "7")
    monkeypatch.setenv("SDXL_MAX_WORKER_AGE_S", "120")
    env = TorchServeProcess(tmp_path, tmp_path).env
    assert (env["SDXL_MAX_REQUESTS_PER_WORKER"], env["SDXL_MAX_WORKER_AGE_S"]) == ("7", "120")
