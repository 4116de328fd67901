"""The speed-switch benchmark's command line (scripts/bench_speed.py)."""

from __future__ import annotations

import pytest

from bench_speed import VARIANTS, main, variant_list

pytestmark = pytest.mark.unit


def test_a_misspelt_variant_is_refused_before_anything_runs(capsys):
    """`--variants fuse_qvk` ran an engine with every switch off and reported it as a
    variant of that name, "1.00x off": a misleading measurement, not an error."""
    with pytest.raises(SystemExit) as exited:
        main(["--variants", "off,fuse_qvk"])
    said = capsys.readouterr().err
    assert exited.value.code == 2 and "not a variant: fuse_qvk" in said, said
    assert variant_list(",".join(VARIANTS)) == list(VARIANTS)
    assert variant_list("compile warm, fuse_qkv") == ["compile warm", "fuse_qkv"]
