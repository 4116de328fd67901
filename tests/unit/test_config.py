"""config/config.properties holds what the hardening promises (the end-to-end tests check
the same against a running server)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sdxl_serve.contract import SDXL_LIMITS
from sdxl_serve.encoding import encode_image
from sdxl_serve.settings import Settings

pytestmark = pytest.mark.unit
CONFIG = Path(__file__).resolve().parents[2] / "config"


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
