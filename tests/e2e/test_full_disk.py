"""A full disk under the TorchServe face's scripts: `make serve`'s run directory, the model
store `make archive` writes into, and `make rollout`'s lock (docs/operations.md, "A full
disk"). Each on a real tmpfs filled to its last byte (the ``full_disk`` fixture)."""

from __future__ import annotations

import errno

import pytest

from lifetimes import started_and_ready
from sdxl_serve.server import Addresses, TorchServeProcess
from test_fail_fast_start import run_serve, serve_command

pytestmark = pytest.mark.e2e

FAST_WARMUP = {"SDXL_WARMUP_SIZES": "32x32", "SDXL_WARMUP_STEPS": "1"}


def test_serve_on_a_full_run_dir_says_so_in_one_line_and_starts_once_there_is_room(
        tmp_path, model_store, full_disk):
    # Java exited 1 without a word: it could not write its key file, and torchserve.out,
    # where it would have said so, is on the same disk. serve.py said only "see" that file.
    full_disk.fill()
    command, env = serve_command(model_store, full_disk.path)
    env["TMPDIR"] = str(tmp_path / "tmp")  # the unpacked archive: 11 MB, more than the disk
    done, _, left = run_serve(command, env, full_disk.path)
    assert done.returncode == 1 and not left, left
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write in {full_disk.path}: No space left on device "
                      f"(ENOSPC)"], done.stderr
    # Nothing it left there stops the next start once there is room (a key file cut short
    # would be read as the new server's).
    full_disk.free()
    server = TorchServeProcess(full_disk.path, model_store, {"sdxl": "sdxl-1.0.mar"},
                               Addresses.free(), env=FAST_WARMUP, tmp_dir=tmp_path / "tmp")
    try:
        started_and_ready(server, {"sdxl": "sdxl-1.0.mar"}, 240)
        assert server.keys()["inference"]
    finally:
        server.stop()


def test_an_archive_build_into_a_full_model_store_leaves_the_store_as_it_was(
        tiny_model_dir, full_disk, capsys):
    # torch-model-archiver's three chained tracebacks, then build_archive.py's own.
    from build_archive import main

    store = full_disk.path
    args = ["--version", "2.0", "--model-dir", str(tiny_model_dir), "--model-store", str(store)]
    assert main(args) == 0
    served = (store / "sdxl-2.0.mar").read_bytes()
    capsys.readouterr()
    full_disk.fill()
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: could not write {store / 'sdxl-2.0.mar'}: No "
                                       f"space left on device (ENOSPC); the model store is "
                                       f"as it was\n")
    assert sorted(path.name for path in store.iterdir()) == ["filler", "sdxl-2.0.mar"]
    assert (store / "sdxl-2.0.mar").read_bytes() == served


def test_a_rollout_on_a_full_run_dir_still_holds_its_lock(full_disk):
    # Writing its pid into the lock file raised ENOSPC: a traceback before step 1, where
    # TorchServe's own answer (docs/operations.md) is a clean refusal.
    from rollout import RolloutError, hold_run_lock

    full_disk.fill()
    with pytest.raises(OSError) as full:
        (full_disk.path / "probe").write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    lock = hold_run_lock(full_disk.path, "sdxl")
    try:
        with pytest.raises(RolloutError, match="another rollout or rollback of sdxl is running"):
            hold_run_lock(full_disk.path, "sdxl")
    finally:
        lock.close()


def test_the_served_versions_record_on_a_full_run_dir_leaves_no_partial_file(full_disk, capsys):
    # Its write made served_versions.json.partial and failed mid-way, and the file stayed.
    from rollout import ServedVersions

    served = ServedVersions(full_disk.path / "served_versions.json", "api-key")
    full_disk.fill()
    served.record("sdxl", {"1.0"}, "1.0")
    assert "could not record the served versions" in capsys.readouterr().out
    assert sorted(path.name for path in full_disk.path.iterdir()) == ["filler"]
    full_disk.free()
    served.record("sdxl", {"1.0"}, "1.0")
    assert served.history("sdxl") == ["1.0"]


def test_a_register_into_a_full_temp_dir_says_the_disk_is_full(tmp_path, model_store, full_disk):
    # TorchServe's answer alone, "Failed to save model: sdxl-1.0.mar", named no cause: it
    # could not unpack the archive in its temp directory, the run directory's tmp/.
    import subprocess

    from test_rollout import rollout_command

    server = TorchServeProcess(full_disk.path, model_store, {}, Addresses.free())
    try:
        server.start()
        server.wait_ready(timeout=240)  # no model: its archive (11 MB) would fill the disk
        full_disk.fill()
        result = subprocess.run(**rollout_command(server, model_store, "--version", "1.0"),
                                capture_output=True, timeout=120)
    finally:
        server.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("1.0 did not register: Failed to save model: sdxl-1.0.mar (cannot write in "
            f"{full_disk.path / 'tmp'}: No space left on device (ENOSPC), where TorchServe "
            "unpacks the archive); nothing is still the default version") in result.stderr, \
        result.stderr
