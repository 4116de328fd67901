"""build_archive.keep_replaced: which replaced archives are kept."""

import pytest

from build_archive import KEEP_REPLACED, keep_replaced

pytestmark = pytest.mark.unit


def test_pruning_keeps_another_versions_archives(tmp_path):
    """`sdxl-1.0.*Z.mar` also matched 1.0.1's kept archives, which sort first: pruning 1.0's
    deleted 1.0.1's, the rollback copies it is there to keep."""
    other = tmp_path / "replaced" / "sdxl-1.0.1.20250101T000000.000000000Z.mar"
    other.parent.mkdir()
    other.write_bytes(b"1.0.1")
    mar = tmp_path / "sdxl-1.0.mar"
    for n in range(KEEP_REPLACED + 2):
        mar.write_bytes(f"build {n}".encode())
        kept = keep_replaced(mar)
        assert mar.read_bytes() == kept.read_bytes()  # linked: the store's file stays
        mar.unlink()
    assert other.read_bytes() == b"1.0.1"
    mine = sorted(p for p in other.parent.iterdir() if p != other)
    assert [p.read_bytes() for p in mine] == [f"build {n}".encode()
                                             for n in range(2, KEEP_REPLACED + 2)]
