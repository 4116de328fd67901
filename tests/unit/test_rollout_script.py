"""rollout.py without a server: how it orders versions, and the README's commands."""

import re
import subprocess
from pathlib import Path

import pytest

from rollout import version_key

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_versions_order_numerically_part_by_part():
    versions = ["1.10", "2.0", "1.9", "1.0", "10.0", "1.0.1"]
    assert sorted(versions, key=version_key) == ["1.0", "1.0.1", "1.9", "1.10", "2.0", "10.0"]


def test_text_parts_order_after_numbers_without_failing():
    assert sorted(["1.0-rc1", "1.0-2", "1.0"], key=version_key) == ["1.0", "1.0-2", "1.0-rc1"]


def test_the_documented_rollout_commands_are_make_targets_that_run_rollout_py():
    section = (REPO / "docs" / "rollouts.md").read_text().split("# Rollouts", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["make", "serve"], ["make", "archive"],
                                         ["make", "rollout"], ["make", "rollback"]]
    for command in commands:
        dry = subprocess.run([*command, "-n"], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    rollout = subprocess.run(["make", "-n", *commands[2][1:]], cwd=REPO, capture_output=True,
                             text=True).stdout
    assert "scripts/rollout.py --name sdxl --version 2.0" in rollout
    rollback = subprocess.run(["make", "-n", "rollback"], cwd=REPO, capture_output=True,
                              text=True).stdout
    assert "scripts/rollout.py --name sdxl --rollback" in rollback


@pytest.mark.parametrize("content", [b"", b"not a zip archive", "truncated"])
def test_an_archive_that_is_not_a_model_archive_is_refused_without_a_traceback(
        tmp_path, capsys, content):
    from rollout import main

    store = tmp_path / "store"
    store.mkdir()
    mar = store / "sdxl-2.0.mar"
    if content == "truncated":  # a copy cut short: a zip without its central directory
        import zipfile
        with zipfile.ZipFile(mar, "w") as archive:
            archive.writestr("MAR-INF/MANIFEST.json", '{"model": {"modelVersion": "2.0"}}')
            archive.writestr("model/weights.bin", b"x" * 4096)
        mar.write_bytes(mar.read_bytes()[:2000])
    else:
        mar.write_bytes(content)
    # Refused before any call to TorchServe: no server is needed.
    assert main(["--version", "2.0", "--model-store", str(store),
                 "--key-file", str(tmp_path / "key_file.json")]) == 1
    error = capsys.readouterr().err
    assert f"{mar} is not a model archive" in error and "Traceback" not in error
