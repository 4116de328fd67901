"""The speed settings (docs/speed.md): parsed, validated, overridable, off by default; the
compile cache's place; the bucket key that chooses compiled or eager per UNet call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdxl_serve.settings import Settings, SettingsError
from sdxl_serve.speed import _signature, compile_cache_dir

pytestmark = pytest.mark.unit


def test_every_switch_is_off_by_default():
    settings = Settings.from_mapping({}, env={})
    assert (settings.compile, settings.fuse_qkv, settings.channels_last) == \
        ("off", False, False)
    assert settings.compile_batch_sizes == (1, 4)


def test_switches_come_from_the_config_and_the_environment():
    settings = Settings.from_mapping(
        {"compile": "default", "fuse_qkv": True, "compile_batch_sizes": [1, 2]},
        env={"SDXL_CHANNELS_LAST": "true", "SDXL_COMPILE": "max-autotune",
             "SDXL_COMPILE_BATCH_SIZES": "1, 8", "SDXL_FUSE_QKV": "0"})
    assert settings.compile == "max-autotune" and settings.compile_batch_sizes == (1, 8)
    assert settings.channels_last is True and settings.fuse_qkv is False


@pytest.mark.parametrize("config, words", [
    ({"compile": "fast"}, ["compile", "fast", "max-autotune"]),
    ({"compile_batch_sizes": "0"}, ["compile_batch_sizes", "0", "max_batch_images"]),
    ({"compile_batch_sizes": "1,9"}, ["compile_batch_sizes", "9", "(8)"]),
    ({"compile_batch_sizes": ""}, ["compile_batch_sizes", "at least one"]),
    ({"compile_batch_sizes": "one"}, ["compile_batch_sizes", "one"]),
    ({"fuse_qkv": "maybe"}, ["fuse_qkv", "maybe", "not a boolean"]),
    ({"channels_last": 2}, ["channels_last"]),
])
def test_bad_speed_settings_fail_naming_the_setting(config, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    for word in words:
        assert word in str(caught.value)


def test_the_compile_cache_outlives_the_engine_process():
    # Never inside a process's own temp space: the setting, else the run directory (a pod
    # volume), else the machine's temp directory, which all engine processes share.
    assert compile_cache_dir(Settings(compile_cache_dir="/cache"), env={}) == Path("/cache")
    assert compile_cache_dir(Settings(), env={"SDXL_RUN_DIR": "/run/sdxl"}) == \
        Path("/run/sdxl/compile-cache")
    assert compile_cache_dir(Settings(), env={}).name == "sdxl-compile-cache"


def test_the_bucket_key_follows_what_dynamo_guards_on():
    latents = torch.zeros(2, 4, 16, 16)
    key = _signature(((latents, torch.tensor(1.0)), {"return_dict": False}))
    assert key == _signature(((torch.ones(2, 4, 16, 16), torch.tensor(9.0)),
                              {"return_dict": False}))  # values are not part of it
    others = [((torch.zeros(1, 4, 16, 16), torch.tensor(1.0)), {"return_dict": False}),
              ((latents, torch.tensor(1, dtype=torch.int64)), {"return_dict": False}),
              ((latents.to(memory_format=torch.channels_last), torch.tensor(1.0)),
               {"return_dict": False}),
              ((latents, torch.tensor(1.0)), {"return_dict": True})]
    assert all(_signature(call) != key for call in others)


def test_quantize_is_none_by_default_and_checked():
    assert Settings.from_mapping({}, env={}).quantize == "none"
    assert Settings.from_mapping({}, env={"SDXL_QUANTIZE": "int8_dynamic"}).quantize == \
        "int8_dynamic"
    with pytest.raises(SettingsError, match="quantize.*fp4"):
        Settings.from_mapping({"quantize": "fp4"}, env={})
