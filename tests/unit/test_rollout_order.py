"""How rollout.py orders versions: the rollback target and what is kept depend on it."""

import pytest

from rollout import version_key

pytestmark = pytest.mark.unit


def test_versions_order_numerically_part_by_part():
    versions = ["1.10", "2.0", "1.9", "1.0", "10.0", "1.0.1"]
    assert sorted(versions, key=version_key) == ["1.0", "1.0.1", "1.9", "1.10", "2.0", "10.0"]


def test_text_parts_order_after_numbers_without_failing():
    assert sorted(["1.0-rc1", "1.0-2", "1.0"], key=version_key) == ["1.0", "1.0-2", "1.0-rc1"]
