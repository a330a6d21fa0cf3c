"""Measurements of graphc: `python -m benchmarks` times it against its peers (issue 6),
`python -m benchmarks.<name>` runs the others. tests/test_benchmarks.py runs the
machinery in its quick mode; no timing is ever asserted."""
