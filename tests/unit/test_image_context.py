"""What the image build may see: the .dockerignore patterns, matched as Docker matches them.

No container runtime runs here, so Docker's rule is applied by hand (moby/patternmatcher):
each pattern is matched against the path from the context's root, ``*`` and ``?`` stay
within one folder, ``**`` spans any number of folders, and a path is excluded when it or
one of its parent folders matches.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().lstrip("/") for line in lines
            if line.strip() and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    regex, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.compile(regex)


def ignored(path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(pattern_regex(p).fullmatch(prefix) for p in patterns() for prefix in prefixes)


def test_the_matcher_is_dockers():
    # Docker's own examples: a bare name matches at the root only; **/ at any depth.
    assert pattern_regex("build").fullmatch("build")
    assert not pattern_regex("build").fullmatch("handler/build")
    assert pattern_regex("**/build").fullmatch("handler/x/build")
    assert pattern_regex("**/*.pyc").fullmatch("a.pyc")
    assert not pattern_regex("*.pyc").fullmatch("a/b.pyc")


@pytest.mark.parametrize("path", [
    "build/run/8080/key_file.json", "handler/build/lib/x.py", "handler/key_file.json",
    "scripts/key_file.json", "handler/sdxl_serve/__pycache__/x.cpython-311.pyc",
    "handler/sdxl_serve.egg-info/PKG-INFO", "scripts/.venv/bin/python", "config/logs/ts_log.log",
    "scripts/model_store/sdxl-1.0.mar", "handler/.pytest_cache/v", "config/.env", ".git/HEAD",
    "tests/conftest.py", "k8s/base/deployment.yaml",
    # make fetch-sdxl's 7 GB and the docs' models/sdxl-ft: the image never packs weights.
    "models/sdxl-base-1.0/unet/diffusion_pytorch_model.fp16.safetensors",
    "models/sdxl-ft/sdxl-manifest.json",
])
def test_what_must_stay_out_is_out_in_any_folder(path):
    assert ignored(path), path


@pytest.mark.parametrize("path", [
    "models/sdxl-base-1.0/unet/diffusion_pytorch_model.fp16.safetensors",
    "models/sdxl-base-1.0.partial/model_index.json", "models/sdxl-ft/sdxl-manifest.json",
])
def test_weights_fetched_into_the_checkout_are_not_for_git(path):
    # fetch_sdxl.py writes into models/ by default (docs/real-sdxl.md): a `git add -A` took
    # its 7 GB, and `git status` listed it as work of the user's.
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert result.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.parametrize("path", [
    "requirements.txt", "requirements.lock", "pyproject.toml", "setup.cfg",
    "handler/sdxl_serve/engine.py", "handler/sdxl_serve_handler.py",
    "config/config.properties", "scripts/build_archive.py", "scripts/build_model.py",
])
def test_what_the_dockerfile_copies_is_in(path):
    assert not ignored(path), path


# --- the image's pip install: hashed pins -------------------------------------------------

def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of requirements.lock."""
    text = (REPO / "requirements.lock").read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        name, version = requirement.split("==")
        entries[name.lower()] = (version, [o.split("=", 1)[1] for o in options
                                           if o.startswith("--hash=")])
    return entries


def test_every_locked_package_is_pinned_with_sha256_hashes():
    entries = lock_entries()
    assert len(entries) > 30  # torch's CUDA dependencies are in, not only our direct pins
    for name, (version, hashes) in entries.items():
        assert version and hashes, name
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_holds_requirements_txt_at_the_same_versions():
    # A pin changed in requirements.txt without `make lock` fails here.
    entries = lock_entries()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert entries[name.lower()][0] == version, (name, version)


def test_the_lock_is_for_the_images_python_and_the_image_requires_its_hashes():
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    # Ubuntu 24.04's python3 is 3.12; torch's Linux wheel pulls CUDA packages only there.
    assert "ubuntu24.04" in dockerfile and "--python-version 3.12" in makefile
    assert "x86_64-manylinux" in makefile and "--generate-hashes" in makefile
    assert "nvidia-cublas" in lock_entries()
    assert "COPY requirements.lock ./" in dockerfile
    assert "pip install --require-hashes --only-binary=:all: -r requirements.lock" in dockerfile
    assert "requirements.txt" not in dockerfile.split("FROM", 1)[1]
