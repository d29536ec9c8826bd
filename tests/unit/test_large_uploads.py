"""The process's count of large uploads against the cores it may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.large_uploads import LargeUploads, usable_cores


def test_a_core_is_to_spare_while_uploads_are_fewer_than_cores() -> None:
    uploads = LargeUploads(cores=2)
    assert uploads.core_to_spare()  # none in flight yet
    uploads.enter()
    assert uploads.core_to_spare()
    uploads.enter()
    assert not uploads.core_to_spare()
    assert uploads.in_flight == 2
    uploads.leave()
    assert uploads.core_to_spare()
    uploads.leave()
    assert uploads.in_flight == 0


def test_the_cores_are_found_on_first_use() -> None:
    uploads = LargeUploads()
    uploads.enter()
    assert uploads.core_to_spare() == (usable_cores() > 1)
    uploads.leave()


@pytest.mark.parametrize(("limit", "expected"), [
    ("max 100000\n", None),          # no CPU limit: the affinity
    ("150000 100000\n", 2),          # 1.5 cores: two may run at once
    ("50000 100000\n", 1),
    ("garbage\n", None),
])
def test_usable_cores_follow_a_cgroup_cpu_limit(
    tmp_path: Path, limit: str, expected: int | None,
) -> None:
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(limit)
    want = affinity if expected is None else min(affinity, expected)
    assert usable_cores(str(path)) == want
    assert usable_cores(str(tmp_path / "missing")) == affinity
