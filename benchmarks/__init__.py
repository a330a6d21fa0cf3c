"""Measurements of graphc: `python -m benchmarks` times it against its peers, quiet and
beside a busy competitor process (issues 6 and 15), `python -m benchmarks.<name>` runs the
others. tests/test_benchmarks.py runs the machinery in its quick mode; no timing is ever
asserted."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, stem: str, result: dict, text: str) -> tuple[Path, Path]:
    """`<stem>.json` (the figures) and `<stem>.md` (their table) in `out`; their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(text)
    return paths
