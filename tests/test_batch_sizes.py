"""Every example's C, for every target, at batch sizes that take every path through it (n = 0
included), under AddressSanitizer and UBSan, against the NumPy reference (tests/sweep.py).

The Cortex-M targets' plain loops run here on the host: the text is the one that ships.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sweep import CC, Sweep, run_and_check, start_build

ROOT = Path(__file__).resolve().parent.parent
# examples/tiny (the MLPerf Tiny models) has budgeted tests of its own: tests/test_tiny.py.
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                  if p.parent != ROOT / "examples" / "tiny")
TARGETS = ("c99", "host", "cortex-m4")


@pytest.mark.skipif(shutil.which(CC) is None, reason="no C compiler")
@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.parent.name if p.stem == "spec"
                         else p.stem)
def test_every_entry_at_every_batch_size(spec, tmp_path, assert_close):
    models = {t: Sweep(spec, t) for t in TARGETS}
    builds = {t: start_build(m, tmp_path / t) for t, m in models.items()}   # in parallel
    for t, m in models.items():
        run_and_check(m, tmp_path / t, builds[t], assert_close)
