"""config/config.properties holds what the hardening promises (the end-to-end tests check
the same against a running server)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sdxl_serve.contract import SDXL_LIMITS
from sdxl_serve.encoding import encode_image
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"


def properties() -> dict[str, str]:
    lines = (CONFIG / "config.properties").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_tokens_on_and_management_and_metrics_on_loopback():
    config = properties()
    assert config["disable_token_authorization"] == "false"
    assert config["management_address"].startswith("http://127.0.0.1:")
    assert config["metrics_address"].startswith("http://127.0.0.1:")
    assert config["enable_model_api"] == "true"
    assert config["install_py_dep_per_model"] == "false"
    assert config["metrics_mode"] == "prometheus"


@pytest.mark.parametrize("url", ["http://attacker.example/evil.mar", "https://x/y.mar",
                                 "file:///etc/passwd", "file:///tmp/model_store/x.mar",
                                 "s3://bucket/x.mar"])
def test_allowed_urls_match_no_url(url):
    # TorchServe accepts a URL only if one of the comma-separated patterns matches it.
    patterns = properties()["allowed_urls"].split(",")
    assert not any(re.fullmatch(pattern, url) for pattern in patterns)


def test_the_largest_reply_fits_max_response_size():
    """num_images at the model's largest size as a JSON reply, the first image twice
    (`image` and `images`), of incompressible pixels: the worst PNG there is."""
    handler = yaml.safe_load((CONFIG / "model-config.yaml").read_text())["handler"]
    settings = Settings.from_mapping(handler, env={})
    side = SDXL_LIMITS.max_size
    noise = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    png = encode_image(Image.fromarray(noise), "png", settings)
    reply = (settings.max_num_images + 1) * len(base64.b64encode(png)) + 4096
    assert reply <= int(properties()["max_response_size"]), reply


def test_requests_are_bounded_and_overload_is_refused_not_queued_for_ever():
    config = properties()
    assert int(config["max_request_size"]) <= 2**20
    assert 1 <= int(config["job_queue_size"]) <= 64
    assert int(config["default_response_timeout"]) >= 120


# --- config/log4j2.xml: TorchServe's own log configuration less the metric echo. ------------

def log4j_config(text: str):
    import xml.etree.ElementTree as ElementTree

    return ElementTree.fromstring(text)  # a malformed file would make log4j fall back silently


def torchserve_log4j() -> str:
    import importlib.util
    import zipfile

    ts_home = Path(list(importlib.util.find_spec("ts").submodule_search_locations)[0])
    with zipfile.ZipFile(ts_home / "frontend" / "model-server.jar") as jar:
        return jar.read("log4j2.xml").decode()


def test_our_log_configuration_keeps_every_torchserve_log_file_and_logger_level():
    ours, theirs = (log4j_config((CONFIG / "log4j2.xml").read_text()),
                    log4j_config(torchserve_log4j()))

    def files(root):
        return {a.get("name"): a.get("fileName") for a in root.iter("RollingFile")}

    def levels(root):
        return {logger.get("name"): logger.get("level") for logger in root.iter("Logger")}

    assert files(ours) == files(theirs) and len(files(ours)) == 5
    # One logger more: the metrics sampler's, at org.pytorch.serve's level and appenders.
    sampler = "org.pytorch.serve.metrics.MetricCollector"
    assert levels(ours) == {**levels(theirs), sampler: levels(theirs)["org.pytorch.serve"]}
    # org.pytorch.serve writes to TorchServe's file and stdout once, not again through Root.
    for name in ("org.pytorch.serve", sampler):
        [serve] = [logger for logger in ours.iter("Logger") if logger.get("name") == name]
        assert serve.get("additivity") == "false"
        assert {ref.get("ref") for ref in serve.iter("AppenderRef")} == {"ts_log", "STDOUT"}
    # Of the sampler's lines, only the start's "no pid yet" goes (TorchServe 0.12's words).
    [quiet] = [logger.find("RegexFilter") for logger in ours.iter("Logger")
               if logger.get("name") == sampler]
    assert (quiet.get("useRawMsg"), quiet.get("onMatch"), quiet.get("onMismatch")) == \
        ("true", "DENY", "NEUTRAL")
    pattern = re.compile(quiet.get("regex"))
    assert pattern.fullmatch("worker pid is not available yet.")
    for kept in ("Failed to collect system metrics", "{}", "Worker died."):
        assert not pattern.fullmatch(kept), kept


def test_our_log_configuration_drops_only_the_echo_of_metric_lines():
    [echo] = [f for f in log4j_config((CONFIG / "log4j2.xml").read_text())
              if f.tag == "RegexFilter"]
    assert (echo.get("useRawMsg"), echo.get("onMatch"), echo.get("onMismatch")) == \
        ("true", "DENY", "NEUTRAL")
    # Matched against the unformatted pattern: only WorkerLifeCycle's echo of a metric line
    # (TorchServe 0.12: logger.info("result={}, pattern={}", ...)), not the lines that say
    # a worker failed or died, which LoadWatch and the tests read.
    pattern = re.compile(echo.get("regex"))
    assert pattern.fullmatch("result={}, pattern={}")
    for kept in ("Load model failed: {}, error: {}", "Backend worker process died.",
                 "Failed to parse metrics line: \"{}\".", "W-9000 State change {} -> {}"):
        assert not pattern.fullmatch(kept), kept


def test_the_pod_starts_java_with_our_log_configuration_unless_vmargs_name_another(tmp_path):
    from sdxl_serve.server import java_command
    from sdxl_serve.server import LOG_CONFIG

    config = tmp_path / "config.properties"
    config.write_text("vmargs=-Dlog4j.configurationFile=file:///etc/their-log4j2.xml\n")
    command = java_command(config, tmp_path, [], env={})
    ours = f"-Dlog4j.configurationFile=file://{LOG_CONFIG}"
    theirs = "-Dlog4j.configurationFile=file:///etc/their-log4j2.xml"
    assert LOG_CONFIG.is_file()
    assert command.index(ours) < command.index(theirs)  # Java takes the last: theirs wins


@pytest.mark.parametrize("config", [CONFIG / "config.properties",
                                    REPO / "k8s" / "base" / "config.properties"])
def test_java_exits_when_its_heap_runs_out_and_keeps_our_log_configuration(config, tmp_path):
    # Without the flag an OutOfMemoryError ended only the threads that met it: /ping and
    # every prediction hung, and Java ran on (tests/e2e/test_java_heap.py).
    from sdxl_serve.server import LOG_CONFIG, java_command

    command = java_command(config, tmp_path, [], env={})
    assert "-XX:+ExitOnOutOfMemoryError" in command
    assert f"-Dlog4j.configurationFile=file://{LOG_CONFIG}" in command
    # Java's default heap (a quarter of the memory it sees) stays: docs/operations.md.
    assert not [word for word in command if word.startswith("-Xmx")]


@pytest.mark.parametrize("model", ["sdxl", "sdxl_stream"])
def test_triton_waits_for_companions_as_long_as_torchserve(model):
    # docs/triton.md says the two adapters batch alike; TorchServe's went from 50 to 5 ms
    # and Triton's stayed at 50 until this test.
    shipped = yaml.safe_load((CONFIG / "model-config.yaml").read_text())
    pbtxt = (CONFIG.parent / "triton-models" / model / "config.pbtxt").read_text()
    [delay_us] = re.findall(r"^\s*max_queue_delay_microseconds:\s*(\d+)", pbtxt, re.M)
    assert int(delay_us) == shipped["maxBatchDelay"] * 1000


@pytest.mark.parametrize("model", ["sdxl", "sdxl_stream"])
def test_triton_queues_as_many_requests_as_torchserve(model):
    # Beyond them each server answers 503 at once; Triton's queue had no bound.
    pbtxt = (CONFIG.parent / "triton-models" / model / "config.pbtxt").read_text()
    [size] = re.findall(r"^\s*default_queue_policy\s*\{\s*max_queue_size:\s*(\d+)", pbtxt,
                        re.M)
    assert int(size) == int(properties()["job_queue_size"])


def test_the_shipped_settings_are_what_torchserve_reads():
    from build_archive import check_batching

    shipped = yaml.safe_load((CONFIG / "model-config.yaml").read_text())
    check_batching(shipped)
    assert shipped["maxBatchDelay"] >= 1
    assert shipped["responseTimeout"] >= 1 and shipped["startupTimeout"] >= 1


@pytest.mark.parametrize("key,value", [
    ("maxBatchDelay", 0), ("maxBatchDelay", -5), ("maxBatchDelay", "5"),
    ("maxBatchDelay", 2.5), ("batchSize", 0), ("batchSize", True),
    ("responseTimeout", "300"), ("responseTimeout", 300.0), ("responseTimeout", 0),
    ("startupTimeout", "600"), ("startupTimeout", -1), ("minWorkers", 0),
    ("maxWorkers", "2"), ("maxWorkers", -1)])
def test_a_value_torchserve_would_replace_is_refused(key, value, tmp_path):
    """TorchServe 0.12 takes these as not set: maxBatchDelay 0 becomes its default 100 ms
    (checked against a running server: describe reports 100), batchSize 0 becomes 1, and
    (its ModelConfig.build run from its jar on these values) `responseTimeout: "300"` is
    logged as invalid and becomes 120 s, which a full SDXL batch or start can outlast. The
    archive is refused before anything is built, naming the key, the value and the rule."""
    from build_archive import BatchingConfigError, build_archive

    config = yaml.safe_load((CONFIG / "model-config.yaml").read_text())
    config[key] = value
    path = tmp_path / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(BatchingConfigError, match=rf"^{key}: {re.escape(repr(value))} is not "
                                                   r"a positive integer"):
        build_archive("sdxl", "1.0", None, tmp_path / "store", config=path)
    assert not (tmp_path / "store").exists()


def stand_in_model(tmp_path: Path) -> Path:
    """The model packed by a build these tests make but never load: a folder keeps the unit
    tier free of building one, and a build that goes ahead by mistake away from the
    checkout's build/tiny-sdxl."""
    folder = tmp_path / "packed-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.mark.parametrize("source,setting,value,message", [
    ("file", "dtype", "float17",
     "setting dtype must be one of auto, float16, bfloat16, float32, got 'float17'"),
    ("file", "max_num_images", 0, "setting max_num_images must be between 1 and 64, got 0"),
    ("file", "fuse_qkv", "maybe",
     "setting fuse_qkv has a bad value 'maybe': not a boolean, use true (1, yes, on) or "
     "false (0, no, off)"),
    ("file", "max_call_cost", 2,
     "setting max_call_cost (2.0) must be at least max_request_cost (4.0)"),
    ("handler_settings", "device", "no-such-device",
     "setting device must be one of auto, cpu, cuda, got 'no-such-device'"),
    # A key no setting declares built and served with the default, silently.
    ("file", "max_num_image", 2,
     "max_num_image is not a handler setting (did you mean max_num_images?): a worker "
     "would ignore it; rename or remove it"),
    ("handler_settings", "health_interval", 5,
     "health_interval is not a handler setting (did you mean health_interval_s?)"),
    ("handler_settings", "no_such_thing", 1, "no_such_thing is not a handler setting: "),
    # The request defaults had no rule: these built, then failed every worker or served.
    ("file", "default_steps", "many", "setting default_steps has a bad value 'many'"),
    ("file", "default_steps", 0, "setting default_steps must be between 1 and 100"),
    ("handler_settings", "default_steps", -3, "setting default_steps must be between 1 and 100"),
    ("file", "default_guidance_scale", 31,
     "setting default_guidance_scale must be between 0 and 30")])
def test_a_handler_setting_the_worker_would_refuse_is_refused(source, setting, value, message,
                                                              tmp_path):
    """The worker reads the archive's handler: section when it loads (Settings); a value it
    refuses used to build into an archive whose every worker then failed at start, on the
    serving machine. The build checks the section it packs (the file's, the caller's
    handler_settings) with the same parser, naming the setting, the value and the rule,
    before anything is built."""
    from build_archive import build_archive
    from sdxl_serve.settings import SettingsError

    config = yaml.safe_load((CONFIG / "model-config.yaml").read_text())
    if source == "file":
        config["handler"][setting] = value
    path = tmp_path / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = {setting: value} if source == "handler_settings" else None
    with pytest.raises(SettingsError, match=f"^{re.escape(message)}"):
        build_archive("sdxl", "1.0", None, tmp_path / "store", config=path,
                      handler_settings=settings, tiny_model=stand_in_model(tmp_path))
    assert not (tmp_path / "store").exists()


def test_an_archive_for_a_gpu_builds_on_a_machine_without_one(tmp_path, monkeypatch):
    """What depends on the machine that serves is left to the load: whether it has a GPU
    (device: cuda), whether vae_dir exists there; and the SDXL_* overrides of the machine
    that builds are not the archive's (one archive serves several deployments)."""
    import zipfile

    from build_archive import build_archive

    monkeypatch.setenv("SDXL_DEVICE", "no-such-device")
    gpu = {"device": "cuda", "dtype": "float16", "vae_dir": "/models/sdxl-vae-fp16-fix"}
    assert not Path(gpu["vae_dir"]).exists()
    mar = build_archive("sdxl", "1.0", None, tmp_path / "store", handler_settings=gpu,
                        tiny_model=stand_in_model(tmp_path))
    with zipfile.ZipFile(mar) as archive:
        packed = yaml.safe_load(archive.read("model-config.yaml"))["handler"]
    assert {key: packed[key] for key in gpu} == gpu


def test_the_shipped_handler_section_passes_the_build_check():
    """Every key of config/model-config.yaml's handler: section is a setting with a value the
    build accepts (the builds above and every archive the suites serve rely on it)."""
    handler = yaml.safe_load((CONFIG / "model-config.yaml").read_text())["handler"]
    Settings.check_portable(handler)


@pytest.mark.parametrize("env, message", [
    ({"SDXL_DTYPE": "float17"}, "SDXL_DTYPE='float17' (an environment override): setting dtype "
                                "must be one of auto, float16, bfloat16, float32, got 'float17'"),
    ({"SDXL_MAX_NUM_IMAGES": "2.9"}, "SDXL_MAX_NUM_IMAGES='2.9' (an environment override): "
                                     "setting max_num_images has a bad value '2.9'"),
    # A rule about two settings names the one the environment set, the other from the file.
    ({"SDXL_MAX_REQUEST_COST": "10"}, "SDXL_MAX_REQUEST_COST='10' (an environment override): "
                                      "setting max_call_cost (8.0) must be at least "
                                      "max_request_cost (10.0)"),
    ({"SDXL_MAX_REQUEST_COST": "10", "SDXL_MAX_CALL_COST": "9"},
     "SDXL_MAX_CALL_COST='9', SDXL_MAX_REQUEST_COST='10' (environment overrides): setting "
     "max_call_cost (9.0) must be at least max_request_cost (10.0)"),
])
def test_a_bad_override_is_refused_with_the_section_naming_the_variable(env, message):
    """Where a server starts on the machine that serves (serve_triton.py), the section is
    checked with the SDXL_* overrides of the environment the models will read: a bad one used
    to pass the check and fail every model's load inside the server. The message names the
    variable, since the file holds no such value; the worker's own check at load says the
    same."""
    from sdxl_serve.settings import SettingsError

    handler = yaml.safe_load((CONFIG / "model-config.yaml").read_text())["handler"]
    for check in (lambda: Settings.check_portable(handler, env=env),
                  lambda: Settings.from_mapping(handler, env=env)):
        with pytest.raises(SettingsError) as caught:
            check()
        assert str(caught.value).startswith(message), str(caught.value)
    Settings.check_portable(handler)  # without env, no override is read (a build)


def test_an_override_is_checked_as_the_worker_reads_it():
    """The environment wins over the section, so an override can mend a bad line; a variable
    that is no setting's, or an empty one, changes nothing."""
    from sdxl_serve.settings import SettingsError

    Settings.check_portable({"dtype": "float17"}, env={"SDXL_DTYPE": "float16"})
    Settings.check_portable({}, env={"SDXL_DTYPE": "", "SDXL_TRITON_HTTP_PORT": "x",
                                     "SDXL_MAX_NUM_IMAGE": "0"})
    # A bad line that no override touches is named as before, without a variable.
    with pytest.raises(SettingsError, match="^setting dtype must be one of .*got 'float17'$"):
        Settings.check_portable({"dtype": "float17"}, env={"SDXL_DEVICE": "cpu"})
    # Nor does a rule about two settings name the override of one that is not the cause:
    # a count of 0 is wrong whatever max_batch_images is.
    with pytest.raises(SettingsError, match="^setting compile_batch_sizes holds 0"):
        Settings.check_portable({"compile_batch_sizes": "0"},
                                env={"SDXL_MAX_BATCH_IMAGES": "8"})
    with pytest.raises(SettingsError, match="^SDXL_MAX_BATCH_IMAGES='2' .*holds 4"):
        Settings.check_portable({"compile_batch_sizes": "1,4"},
                                env={"SDXL_MAX_BATCH_IMAGES": "2"})


def test_a_model_store_that_is_a_file_is_refused_in_one_line(tmp_path):
    # It was a FileExistsError traceback from the build's mkdir.
    store = tmp_path / "store"
    store.write_text("not a folder")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "build_archive.py"),
                           "--model-store", str(store)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        f"argument --model-store: {str(store)!r} is a file, not a folder of archives"), \
        done.stderr
