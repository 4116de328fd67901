"""Where profiles go by default, and how the store names, finds and prunes them (files only;
the profiler itself runs in tests/handler/test_profiling.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from sdxl_serve.profiling import TraceStore, default_profile_dir

pytestmark = pytest.mark.unit


def test_the_default_directory_is_the_run_directory_then_the_temp_directory(tmp_path,
                                                                             monkeypatch):
    assert default_profile_dir({"SDXL_RUN_DIR": "/run/sdxl"}, parent_pid=os.getpid()) == \
        Path("/run/sdxl/profiles")
    # Under TorchServe the parent is the frontend, whose working directory is the run dir.
    monkeypatch.chdir(tmp_path)
    assert default_profile_dir({}, parent_pid=os.getpid()) == tmp_path.resolve() / "profiles"
    assert default_profile_dir({}, parent_pid=None) == \
        Path(tempfile.gettempdir()) / "sdxl-profiles"


def fake_profile(directory: Path, stamp: str) -> str:
    name = f"profile-{stamp}-123"
    (directory / f"{name}.json.gz").write_bytes(b"x" * 10)
    (directory / f"{name}.txt").write_text(f"profile {name}\n")
    return name


def test_newest_first_found_by_prefix_and_pruned_to_keep(tmp_path):
    names = [fake_profile(tmp_path, f"20260101T00000{i}000000Z") for i in range(4)]
    store = TraceStore(tmp_path, keep=2)
    assert [t.name for t in store.traces()] == names[::-1]
    assert store.find().name == names[3]
    assert store.find(names[1][:26]).name == names[1]
    assert store.find(names[0] + ".txt").name == names[0]  # a file name works too
    with pytest.raises(LookupError):
        store.find("profile-2026")  # ambiguous
    store.prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}{suffix}" for n in names[2:] for suffix in (".json.gz", ".txt"))
    with pytest.raises(LookupError):
        TraceStore(tmp_path / "none", keep=1).find()
