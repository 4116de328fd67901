"""Settings are read once, validated, and overridable by SDXL_* variables."""

from __future__ import annotations

import base64
import logging
import re
import sys
from pathlib import Path

import pytest

from sdxl_serve.model_files import write_manifest
from sdxl_serve.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_environment_overrides_the_model_config():
    settings = Settings.from_mapping({"max_num_images": 2}, env={"SDXL_MAX_NUM_IMAGES": "3"})
    assert settings.max_num_images == 3


def test_a_key_no_setting_declares_is_named_in_a_warning_at_load(caplog):
    """A typo used to load and serve with the default, silently. At load it is named, with
    the setting it was probably meant to be; not refused (an archive's section may come from
    another version of the package: settings.py says why), and the build refuses it."""
    with caplog.at_level(logging.WARNING, logger="sdxl_serve.settings"):
        settings = Settings.from_mapping({"max_num_image": 1, "health_interval": 5}, env={})
    assert settings.max_num_images == 4 and settings.extra == {"max_num_image": 1,
                                                                "health_interval": 5}
    assert [record.getMessage() for record in caplog.records] == [
        "max_num_image (did you mean max_num_images?), health_interval (did you mean "
        "health_interval_s?) are not handler settings: ignored"]


def test_sdxl_variables_that_are_no_setting_stay_ignored(caplog):
    """Other tools set SDXL_-prefixed variables too (the test run's id, the run directory):
    only a declared setting's variable is read, and the others are not worth a warning."""
    env = {"SDXL_RUN_DIR": "/somewhere", "SDXL_TEST_RUN": "1", "SDXL_MAX_NUM_IMAGE": "1"}
    with caplog.at_level(logging.WARNING, logger="sdxl_serve.settings"):
        settings = Settings.from_mapping({}, env=env)
    assert settings.extra == {} and settings.max_num_images == 4
    assert caplog.records == []


def test_default_steps_and_guidance_are_settings():
    """They used to be read from the undeclared keys by the engine, with no rule."""
    settings = Settings.from_mapping({"default_steps": 4, "default_guidance_scale": "1.5"},
                                     env={"SDXL_DEFAULT_STEPS": "8"})
    assert (settings.default_steps, settings.default_guidance_scale) == (8, 1.5)
    assert settings.extra == {}
    assert (Settings().default_steps, Settings().default_guidance_scale) == (30, 5.0)


@pytest.mark.parametrize("config, message", [
    ({"default_steps": "many"}, "setting default_steps has a bad value 'many'"),
    ({"default_steps": True}, "setting default_steps has a bad value True"),
    ({"default_steps": 0}, "setting default_steps must be between 1 and 100 (the bounds of a "
                           "request's num_inference_steps), got 0"),
    ({"default_steps": -3}, "setting default_steps must be between 1 and 100"),
    ({"default_steps": 101}, "setting default_steps must be between 1 and 100"),
    ({"default_guidance_scale": -1}, "setting default_guidance_scale must be between 0 and 30 "
                                     "(the bounds of a request's guidance_scale), got -1.0"),
    ({"default_guidance_scale": 1000}, "setting default_guidance_scale must be between 0 and 30"),
    ({"default_guidance_scale": "nan"}, "setting default_guidance_scale has a bad value 'nan'"),
])
def test_bad_request_defaults_are_refused(config, message):
    """A default is what a request that names nothing gets, so it keeps the request's bounds
    (contract.py): 0 steps made every request's cost a division by zero, at warm-up, and -3
    was served; "many" failed the engine process with int()'s own words."""
    for check in (lambda: Settings.from_mapping(config, env={}),
                  lambda: Settings.check_portable(config)):
        with pytest.raises(SettingsError) as caught:
            check()
        assert str(caught.value).startswith(message)



@pytest.mark.parametrize("value, refused", [(60, False), (61, True), (600, True)])
def test_a_metrics_interval_past_a_minute_is_refused(value, refused):
    """The alerts, the dashboard and the autoscalers count a worker only while its age, written
    every metrics_interval_s, moved within 2 minutes (k8s/components/monitoring): 600 was
    taken, and every live worker dropped out of them."""
    config = {"metrics_interval_s": value}
    if not refused:
        assert Settings.from_mapping(config, env={}).metrics_interval_s == value
        return
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    assert str(caught.value).startswith(
        f"setting metrics_interval_s must be between 0.1 and 60 (a live worker's age must "
        f"move within the 2 minutes the alerts and autoscalers look at), got {value}")

def test_warmup_sizes_parse_from_text_and_lists():
    assert Settings.from_mapping({"warmup_sizes": "64x64, 128x96"}, env={}).warmup_sizes == \
        ((64, 64), (128, 96))
    assert Settings.from_mapping({"warmup_sizes": [[64, 64]]}, env={}).warmup_sizes == \
        ((64, 64),)


@pytest.mark.parametrize("sizes", ["33x33", "64x0", "-8x64", "64x60, 64x64"])
def test_a_warmup_size_no_model_can_generate_is_refused_at_build_naming_it(sizes):
    """33x33 built, then every worker's start failed on a request's error about `width`."""
    with pytest.raises(SettingsError) as caught:
        Settings.check_portable({"warmup_sizes": sizes})
    assert str(caught.value).startswith("setting warmup_sizes holds ")
    assert "both positive multiples of 8" in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        Settings.check_portable({}, env={"SDXL_WARMUP_SIZES": sizes})
    assert str(caught.value).startswith(f"SDXL_WARMUP_SIZES={sizes!r} (an environment override)")


@pytest.mark.parametrize("config, words", [
    ({"device": "tpu"}, ["device", "tpu", "cpu"]),
    ({"dtype": "int8"}, ["dtype", "int8"]),
    ({"max_num_images": 0}, ["max_num_images", "0"]),
    ({"max_num_images": "many"}, ["max_num_images", "many"]),
    ({"png_compress_level": True}, ["png_compress_level"]),
    ({"model_dir": "/nonexistent/sdxl"}, ["model_dir", "not a directory"]),
    ({"cancel_dir": "/nonexistent/cancel"}, ["cancel_dir", "not a directory"]),
])
def test_bad_settings_fail_fast_naming_the_setting(config, words):
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("config, message", [
    ({"max_num_images": 2.9}, "setting max_num_images has a bad value 2.9: not a whole number"),
    ({"default_steps": 2.5}, "setting default_steps has a bad value 2.5: not a whole number"),
])
def test_a_fraction_for_a_whole_number_is_refused_not_cut(config, message):
    """int() cut a YAML 2.9 to 2 silently, where SDXL_MAX_NUM_IMAGES=2.9 was refused."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    assert str(caught.value) == message
    assert Settings.from_mapping({"max_num_images": 4.0}, env={}).max_num_images == 4


@pytest.mark.parametrize("config, message", [
    ({"max_num_images": "abc"}, "setting max_num_images has a bad value 'abc': not a whole "
                                "number"),
    ({"max_num_images": "2.5"}, "setting max_num_images has a bad value '2.5': not a whole "
                                "number"),
    ({"engine_stall_s": "1,5"}, "setting engine_stall_s has a bad value '1,5': not a number"),
    ({"warmup_sizes": "64"}, "setting warmup_sizes has a bad value '64': each size must be "
                             "WIDTHxHEIGHT in whole numbers, e.g. 1024x1024,768x1344"),
    ({"compile_batch_sizes": "a,b"}, "setting compile_batch_sizes has a bad value 'a,b': each "
                                     "must be a whole number, e.g. 1,4"),
])
def test_a_value_that_cannot_be_read_is_refused_with_the_rule_in_words(config, message):
    """`make serve` with SDXL_WARMUP_SIZES=64 said "invalid literal for int() with base 10:
    ''", and SDXL_ENGINE_STALL_S=1,5 "could not convert string to float": Python's words,
    not the setting's rule."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping(config, env={})
    assert str(caught.value) == message


@pytest.mark.parametrize("section, section_is_a_cause", [
    ({}, False),                      # the variable against the default max_call_cost
    ({"dtype": "float32"}, False),    # the section sets nothing the rule is about
    ({"max_call_cost": 8}, True),     # the variable against the section's own line
])
def test_a_refusal_says_whether_the_section_is_part_of_its_cause(section, section_is_a_cause):
    """make serve names the archive's section only where it is part of the cause: counting
    only the variables, a rule between SDXL_MAX_REQUEST_COST and the default max_call_cost
    blamed a section that sets neither."""
    with pytest.raises(SettingsError) as caught:
        Settings.check_serving(section, env={"SDXL_MAX_REQUEST_COST": "10"})
    assert caught.value.settings == ("max_call_cost", "max_request_cost")
    assert caught.value.overridden is not section_is_a_cause


def test_a_vae_dir_the_load_would_refuse_is_refused_before_serving(tmp_path):
    """make serve refused an SDXL_MODEL_DIR without a manifest before TorchServe started,
    but started it for such an SDXL_VAE_DIR, whose every worker's load then failed."""
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    env = {"SDXL_VAE_DIR": str(vae)}
    with pytest.raises(SettingsError) as caught:
        Settings.check_serving({}, env=env)
    assert str(caught.value).startswith(f"SDXL_VAE_DIR={str(vae)!r} (an environment override): "
                                        f"vae_dir: {vae} has no sdxl-manifest.json")
    # fetch_sdxl.py fetches SDXL base whole, never a VAE on its own: a VAE folder's one
    # way to a manifest is the command that writes it.
    assert "fetch_sdxl.py" not in str(caught.value)
    assert f"write one with `{sys.executable} -m sdxl_serve.model_files write {vae}`" \
        in str(caught.value)
    Settings.check_serving({"model_file_check": "off"}, env=env)  # unchecked, as it loads
    write_manifest(vae)
    Settings.check_serving({}, env=env)
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"cut")
    with pytest.raises(SettingsError, match="3 bytes, the manifest says 7"):
        Settings.check_serving({"vae_dir": str(vae)}, env={})


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
    assert settings.engine_stall_s == 60.0  # far inside responseTimeout (300 s)
    assert Settings.from_mapping({"engine_stall_s": 0}, env={}).engine_stall_s == 0
    assert settings.engine_start_s == 600.0
    assert Settings.from_mapping({"engine_start_s": 0}, env={}).engine_start_s == 0


def test_the_model_config_sets_what_the_defaults_say():
    # config/model-config.yaml documents each setting; its values are the defaults.
    import yaml

    model_config = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" /
                                   "model-config.yaml").read_text())
    handler = model_config["handler"]
    configured = Settings.from_mapping(handler, env={})
    # A start TorchServe gives up on first (startupTimeout) ends the worker, not the engine.
    assert configured.engine_start_s == model_config["startupTimeout"]
    for name in ("circuit_failure_threshold", "circuit_cooldown_s", "engine_stall_s",
                 "engine_start_s",
                 "profile_every_n_requests", "profile_keep", "profile_dir",
                 "default_steps", "default_guidance_scale"):
        assert name in handler, name
        assert getattr(configured, name) == getattr(Settings(), name), name
    assert configured.extra == {}  # every key of the shipped section is a setting


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
    ({"engine_stall_s": 2}, ["engine_stall_s", "between 5", "or 0"]),
    ({"engine_stall_s": -1}, ["engine_stall_s", "-1"]),
    ({"engine_start_s": 1}, ["engine_start_s", "between 5", "or 0"]),
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


def test_the_job_dispatcher_refuses_a_cancel_dir_that_is_not_there(monkeypatch, capsys):
    # Its flags would go nowhere: its canceled jobs would seem to stop and run to their ends.
    # Only the dispatcher reads it: the API may share the environment without the volume.
    from sdxl_jobs import dispatcher
    from sdxl_jobs.settings import JobSettings

    monkeypatch.setenv("SDXL_JOBS_CANCEL_DIR", "/nonexistent/cancel")
    assert JobSettings.from_env({"SDXL_JOBS_CANCEL_DIR": "/nonexistent/cancel"}).cancel_dir
    with pytest.raises(SystemExit) as exited:
        dispatcher.main(["--redis", "redis://127.0.0.1:1/0", "--key-file", "key_file.json"])
    assert exited.value.code == 2
    assert "SDXL_JOBS_CANCEL_DIR '/nonexistent/cancel' is not a directory" in \
        capsys.readouterr().err


@pytest.mark.parametrize("name, raw", [("LEASE_S", "nan"), ("BODY_TIMEOUT_S", "inf"),
                                       ("DRAIN_S", "-1"), ("MAX_WAIT_S", "0")])
def test_a_job_setting_that_is_not_a_positive_finite_number_fails_the_start(name, raw):
    """`nan` passed the `<= 0` check: a lease of NaN failed every read of the queue, and the
    dispatcher logged 'queue unreachable' every second while it checked in as live."""
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    # Named as the user sets it (it said `lease_s`, a name no variable has).
    with pytest.raises(JobSettingsError,
                       match=f"^SDXL_JOBS_{name} must be a positive finite number"):
        JobSettings.from_env({f"SDXL_JOBS_{name}": raw})


@pytest.mark.parametrize("name, raw", [
    # Each failed long after the start, at Redis: every cancel ("value is not an integer or
    # out of range"), every read of the queue ("Invalid min-idle-time").
    ("RESULT_TTL_S", "99999999999999999"), ("LEASE_S", "1e30"), ("CONSUMER_IDLE_S", "1e19"),
    ("MAX_WAIT_S", "315360001"), ("DRAIN_S", "1e300")])
def test_a_job_setting_in_seconds_past_what_redis_takes_fails_the_start(name, raw):
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    with pytest.raises(JobSettingsError) as refused:
        JobSettings.from_env({f"SDXL_JOBS_{name}": raw})
    assert str(refused.value) == (f"SDXL_JOBS_{name} must be at most 315360000 seconds (10 "
                                  f"years; Redis takes it in milliseconds, a 64-bit integer), "
                                  f"got {raw}")
    assert JobSettings.from_env({f"SDXL_JOBS_{name}": "315360000"})


@pytest.mark.parametrize("raw", ["-5", "0", "-0.0"])
def test_a_refused_job_setting_is_shown_as_set(raw):
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    # It said `got -5.0` for `-5`, a value nobody set.
    with pytest.raises(JobSettingsError, match=f"^SDXL_JOBS_LEASE_S must be a positive finite "
                                               f"number, got {raw}$"):
        JobSettings.from_env({"SDXL_JOBS_LEASE_S": raw})


@pytest.mark.parametrize("raw", ["0.5", "nan", "-1", "86401"])
def test_a_redis_rewrite_interval_that_is_no_interval_fails_the_start(raw):
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    with pytest.raises(JobSettingsError, match=f"^SDXL_JOBS_REDIS_REWRITE_S must be 0 \\(off\\) "
                                               f"or a number of seconds from 1 to 86400, got "
                                               f"{raw}$"):
        JobSettings.from_env({"SDXL_JOBS_REDIS_REWRITE_S": raw})
    # Off unless set: a Redis of the user's may refuse BGREWRITEAOF.
    assert JobSettings().redis_rewrite_s == 0
    assert JobSettings.from_env({"SDXL_JOBS_REDIS_REWRITE_S": "900"}).redis_rewrite_s == 900


REFUSED_WEBHOOK_SECRETS = [
    ("whsec_", "it holds 0 bytes"),
    ("whsec_!!!!", "what follows whsec_ is not base64"),  # decoded leniently: the empty key
    ("whsec_c2VjcmV0-xyz", "what follows whsec_ is not base64"),
    ("whsec_abc", "what follows whsec_ is not base64"),  # failed every delivery for good
    ("whsec_c2VjcmV0", "it holds 6 bytes"),
    # Set, without its prefix: said "must be set", as if it were not.
    ("nope", "it does not start with whsec_"),
    ("c2VjcmV0LWtleS1vZi0xNi1ieXRlcw==", "it does not start with whsec_")]


@pytest.mark.parametrize("secret, wrong", REFUSED_WEBHOOK_SECRETS)
def test_a_webhook_secret_anyone_could_sign_with_fails_the_start(secret, wrong, capsys):
    """`whsec_` passed the check and signed every delivery with an empty HMAC key, so
    anyone could send a receiver a job.succeeded it would accept; a key that was not base64
    passed it too and failed every delivery when it was signed, each left pending for good.
    Now the start ends in one line, exit 2, without the secret."""
    from sdxl_jobs import dispatcher
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    env = {"SDXL_JOBS_WEBHOOK_ALLOW": "hooks.example.com", "SDXL_JOBS_WEBHOOK_SECRET": secret}
    with pytest.raises(JobSettingsError, match=f"^SDXL_JOBS_WEBHOOK_SECRET must be whsec_ "
                                               f"and the base64 of at least 16 random bytes "
                                               f".*; {wrong}$") as caught:
        JobSettings.from_env(env)
    assert not secret.removeprefix("whsec_") or \
        secret.removeprefix("whsec_") not in str(caught.value)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(SystemExit) as exited:
            dispatcher.main(["--key-file", "key_file.json"])
    assert exited.value.code == 2 and wrong in capsys.readouterr().err
    strong = "whsec_" + base64.b64encode(bytes(range(16))).decode()
    assert JobSettings.from_env({**env, "SDXL_JOBS_WEBHOOK_SECRET": strong}).webhook_secret


@pytest.mark.parametrize("entry", [
    "https://hooks.example.com", "hooks.example.com/sdxl", "hooks.example.com:",
    "hooks.example.com:https", "hooks.example.com:70000", "hooks.example.com:0",
    "*.example.com", "hooks..example.com", "[10.0.0.5]:80", "[fd00::5]8443", "[fd00::5",
    "[fd00::5]:", "fd00::5::6", "höoks.example.com"])
def test_a_webhook_allow_entry_that_names_no_destination_fails_the_start(entry, capsys):
    """An entry that is no `host` or `host:port` (a URL pasted in, a path, a wildcard) was
    taken and allowed nothing, without a word: every webhook to the host the operator meant
    was a 400 saying that host is not an allowed destination. Now the start ends in one
    line naming the entry, exit 2."""
    from sdxl_jobs import dispatcher
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    strong = "whsec_" + base64.b64encode(bytes(range(16))).decode()
    env = {"SDXL_JOBS_WEBHOOK_ALLOW": f"ok.example.com, {entry}",
           "SDXL_JOBS_WEBHOOK_SECRET": strong}
    rule = "^SDXL_JOBS_WEBHOOK_ALLOW's entries must be host or host:port .*, got "
    with pytest.raises(JobSettingsError, match=rule + re.escape(repr(entry)) + "$"):
        JobSettings.from_env(env)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(SystemExit) as exited:
            dispatcher.main(["--key-file", "key_file.json"])
    assert exited.value.code == 2 and repr(entry) in capsys.readouterr().err


def test_every_form_of_webhook_allow_entry_the_docs_name_starts():
    from sdxl_jobs.settings import JobSettings

    entries = ("hooks.example.com", "hooks.example.com:443", "10.0.0.5:8443", "[fd00::5]:8443",
               "[FD00:0::5]", "fd00::5", "fd00::5:8443", "localhost:9000", "127.0.0.1",
               "ts_1.svc.", "Hooks.Example.COM")
    strong = "whsec_" + base64.b64encode(bytes(range(16))).decode()
    settings = JobSettings.from_env({"SDXL_JOBS_WEBHOOK_ALLOW": ",".join(entries),
                                     "SDXL_JOBS_WEBHOOK_SECRET": strong})
    assert settings.webhook_allow == entries
    # Compared as read once at the start, each host in one spelling (shown as written).
    assert settings.allowed_destinations == {
        "hooks.example.com", "hooks.example.com:443", "10.0.0.5:8443", "[fd00::5]:8443",
        "[fd00::5]", "fd00::5", "fd00::5:8443", "localhost:9000", "127.0.0.1", "ts_1.svc."}


@pytest.mark.parametrize("entry, url", [
    # Compared as written against destinations written `hooks.example.com:443`, it allowed
    # nothing (and a sixth digit was refused, where a webhook URL's port may have as many).
    ("hooks.example.com:000443", "https://hooks.example.com/sdxl"),
    # A webhook URL keeps its address's zone, as an entry does (refusing such entries at
    # the start, as first written, made these webhooks refused by every list).
    ("fe80::1%eth0", "http://[fe80::1%eth0]:8080/h")])
def test_an_allow_entry_in_another_spelling_allows_its_destination(entry, url):
    from sdxl_jobs.settings import JobSettings
    from sdxl_jobs.webhooks import check_webhook

    strong = "whsec_" + base64.b64encode(bytes(range(16))).decode()
    settings = JobSettings.from_env({"SDXL_JOBS_WEBHOOK_ALLOW": entry,
                                     "SDXL_JOBS_WEBHOOK_SECRET": strong})
    assert check_webhook(url, None, settings)[0] == url


def test_a_webhook_secret_read_from_a_file_with_its_newline_still_starts_and_signs_alike():
    """A Kubernetes Secret made from a file (`echo whsec_... > f`) ends in a newline, and
    `openssl rand -base64 64` breaks its line: the signer's decoder drops both, so such a
    secret signed with its receiver's key before the start's check, which then refused it
    (API and dispatcher failing every start)."""
    from sdxl_jobs.settings import JobSettings
    from sdxl_jobs.webhooks import sign

    key = bytes(range(64))
    one_line = "whsec_" + base64.b64encode(key).decode()
    as_read = "whsec_" + base64.encodebytes(key).decode()  # 76-character lines, final newline
    assert "\n" in as_read.rstrip("\n")
    settings = JobSettings.from_env({"SDXL_JOBS_WEBHOOK_ALLOW": "hooks.example.com",
                                     "SDXL_JOBS_WEBHOOK_SECRET": as_read})
    assert sign(settings.webhook_secret, "m", 1, b"{}") == sign(one_line, "m", 1, b"{}")


@pytest.mark.parametrize("secret, wrong", REFUSED_WEBHOOK_SECRETS)
def test_a_signature_is_never_made_with_a_secret_the_start_refuses(secret, wrong):
    """The signer decoded the secret with a lenient decoder of its own, so it signed with
    the empty key (`whsec_`, `whsec_!!!!`) and with 6 bytes where the start refuses them:
    now it refuses them too, in the start's words."""
    from sdxl_jobs.settings import JobSettingsError
    from sdxl_jobs.webhooks import sign

    with pytest.raises(JobSettingsError, match=f"; {wrong}$"):
        sign(secret, "msg_1", 1700000000, b"{}")


@pytest.mark.parametrize("secret", ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                    "whsec_MfKQ9r8GKYqrTwjUPD8I\nLPZIo2LaLaSw\n"])
def test_a_valid_secret_signs_as_the_standard_webhooks_test_vector_says(secret):
    """The Standard Webhooks libraries' own test vector (id, timestamp, body, secret and the
    signature their receivers accept): the one decoder signs it byte for byte, a secret
    with line breaks (read from a file) too."""
    from sdxl_jobs.webhooks import sign

    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("name, raw, rule", [("MAX_ATTEMPTS", "2.5", "a whole number"),
                                             ("RATE_PER_MINUTE", "ten", "a whole number"),
                                             ("LEASE_S", "30s", "a number")])
def test_a_job_setting_that_is_not_a_number_names_the_number_it_must_be(name, raw, rule):
    """`SDXL_JOBS_MAX_ATTEMPTS=2.5` was refused as not "a number", which 2.5 is: the rule
    is a whole number."""
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    with pytest.raises(JobSettingsError, match=f"^SDXL_JOBS_{name} must be {rule}, got "
                                               f"'{raw}'$"):
        JobSettings.from_env({f"SDXL_JOBS_{name}": raw})


@pytest.mark.parametrize("raw, read", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False), ("", False)])
def test_every_boolean_setting_takes_the_same_words(raw, read):
    """`SDXL_JOBS_REDIS_NO_AOF_OK` took 1, 0, true and false alone, and refused the yes, no,
    on and off every handler boolean takes: one parser reads them all. Empty is false, the
    default of each (a handler override that is empty is not read)."""
    from sdxl_jobs.settings import JobSettings

    assert JobSettings.from_env({"SDXL_JOBS_REDIS_NO_AOF_OK": raw}).redis_no_aof_ok is read
    assert Settings.from_mapping({"device": "cpu", "fuse_qkv": raw}, env={}).fuse_qkv is read


def test_a_boolean_job_setting_that_is_no_boolean_fails_naming_the_variable_and_the_words():
    """The no-AOF acknowledgement silences a warning about lost jobs: a value meant as yes
    but read as no (or the reverse) must fail the start."""
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    assert JobSettings().redis_no_aof_ok is False
    with pytest.raises(JobSettingsError, match=r"^SDXL_JOBS_REDIS_NO_AOF_OK must be true "
                                               r"\(1, yes, on\) or false \(0, no, off\), "
                                               r"got 'maybe'$"):
        JobSettings.from_env({"SDXL_JOBS_REDIS_NO_AOF_OK": "maybe"})


def test_an_unquoted_off_in_yaml_is_off():
    # YAML 1.1 reads `compile: off` as false; the worker refused it as 'False'.
    import yaml

    section = yaml.safe_load("model_file_check: off\ncompile: off\n")
    assert section == {"model_file_check": False, "compile": False}
    settings = Settings.from_mapping(section, env={})
    assert (settings.model_file_check, settings.compile) == ("off", "off")


@pytest.mark.parametrize("part", ["api", "dispatcher"])
def test_the_job_log_level_takes_any_case_and_a_bad_one_fails_the_start_in_one_line(
        part, monkeypatch, capsys):
    """SDXL_JOBS_LOG_LEVEL went to logging as written: `debug` (lower case, as the other
    settings are written) and `verbose` were a traceback ("Unknown level")."""
    import importlib

    from sdxl_jobs.settings import JobSettings

    assert JobSettings.from_env({"SDXL_JOBS_LOG_LEVEL": "debug"}).log_level == "debug"
    monkeypatch.setenv("SDXL_JOBS_LOG_LEVEL", "verbose")
    main = importlib.import_module(f"sdxl_jobs.{part}").main
    with pytest.raises(SystemExit) as exited:
        main(["--redis", "redis://127.0.0.1:1/0", "--key-file", "key_file.json"]
             if part == "dispatcher" else ["--redis", "redis://127.0.0.1:1/0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: SDXL_JOBS_LOG_LEVEL must be one of DEBUG, INFO, WARNING, WARN, ERROR, "
        "CRITICAL, FATAL, NOTSET, got 'verbose'")


@pytest.mark.parametrize("level", ["WARN", "CRITICAL", "FATAL", "NOTSET", "warn", "critical"])
def test_every_log_level_logging_took_before_still_starts(level):
    """SDXL_JOBS_LOG_LEVEL went to logging as written, which takes WARN and CRITICAL too: a
    deployment that set one started, and refused it would exit 2 on an upgrade."""
    import logging

    from sdxl_jobs.settings import JobSettings

    settings = JobSettings.from_env({"SDXL_JOBS_LOG_LEVEL": level})
    assert logging.getLevelName(settings.log_level.upper()) in (0, 10, 20, 30, 40, 50)


@pytest.mark.parametrize("url, rule", [
    ("http://:hunter2@redis:6379/0", "must be a redis://, rediss:// (TLS) or unix:// URL"),
    ("rediss://jobs:hunter2@redis:6380/0?ssl_check_hostname=1&db=x",
     "Invalid value for 'db' in connection URL"),
    # Unencoded, a / or # ends the URL's user part early: redis-py's own error quoted the
    # password's start as the port, in a traceback, at the first connection.
    ("rediss://jobs:hunt/er2@redis:6380/0", "its port is no number"),
    # A second "://" in the password: the part before it was shown, taken for the scheme.
    ("rediss://jobs:hunt://er2@redis:6380/0", "its port is no number"),
    ("redis://:hunter2@redis:6379/0?ssl_ca_certs=/nonexistent/ca.crt",
     "ssl_ca_certs '/nonexistent/ca.crt' is not a file"),
    ("redis://redis:6379/0?password=hunter2&ssl_keyfile=/nonexistent/k",
     "ssl_keyfile '/nonexistent/k' is not a file")])
def test_a_redis_url_that_cannot_work_fails_the_start_without_its_password(
        url, rule, capsys):
    """The check printed the whole URL, password and all, into the error (and so into the
    pod's log); a URL redis-py cannot read, or that names a TLS file that is not there,
    passed it and failed at the first connection. Now the start ends in one line naming the
    URL with its password as ***."""
    from sdxl_jobs import dispatcher, keys
    from sdxl_jobs.settings import JobSettings, JobSettingsError

    with pytest.raises(JobSettingsError, match=re.escape(rule)) as caught:
        JobSettings.from_env({"SDXL_REDIS_URL": url})
    assert "hunt" not in str(caught.value) and "***" in str(caught.value)
    assert str(caught.value).startswith("SDXL_REDIS_URL")
    # Given with --redis, the refusal names the flag, not a variable that is not set.
    for command in (lambda: dispatcher.main(["--redis", url, "--key-file", "key_file.json"]),
                    lambda: keys.main(["list", "--redis", url])):
        with pytest.raises(SystemExit) as exited:
            command()
        said = capsys.readouterr().err
        assert exited.value.code == 2 and rule in said and "hunt" not in said
        assert "error: --redis" in said and "SDXL_REDIS_URL" not in said, said


def test_a_redis_url_with_a_url_in_its_query_is_shown_without_its_password():
    """The URL's scheme was taken up to its last "://": one in the query (a client name
    that is a URL) made all before it the "scheme", password and all, in the `job store:`
    line each start logs."""
    from sdxl_jobs.settings import check_redis_url, redacted_url

    url = "redis://:hunter2@redis:6379/0?client_name=http://sdxl"
    check_redis_url(url)  # a URL that works: it is logged
    assert redacted_url(url) == "redis://:***@redis:6379/0?client_name=http://sdxl"
