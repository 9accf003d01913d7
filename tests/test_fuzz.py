"""Seeded random corruptions of every reader's input (tools/fuzz.py): each case ends in data that passes the
reader's own checks or in the project's one-sentence DataError; never a traceback, a hang or a written file."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402


@pytest.mark.parametrize("kind", fuzz.FORMATS)
def test_readers_survive_random_corruption(kind):
    before = fuzz.repo_snapshot()
    counts, failures = fuzz.fuzz_format(kind, 300, seed=0, timeout=10, log=lambda _: None)
    assert not failures, failures[:3]
    assert not any(k.endswith(("crash", "hang")) for k in counts), counts
    assert counts["refused"] > 0 and counts["ok"] > 0  # the corruptions reach both outcomes
    assert fuzz.repo_snapshot() == before
