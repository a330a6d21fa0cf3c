"""Reading spec files: YAML (safely) or JSON, rejecting duplicate keys."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .graph import Graph

MAX_SPEC_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1}; "
                                f"first at line {seen[key] + 1})",
                                node=key if isinstance(key, str) else None)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SpecError(f"duplicate key {k!r}", node=k)
        out[k] = v
    return out


def _reject_constant(token):
    raise SpecError(f"{token} is not a valid number in a spec")


def parse_spec_text(text: str, *, fmt: str = "yaml") -> Any:
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_reject_duplicates,
                              parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise SpecError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}") from None


def load(path: str | os.PathLike) -> Graph:
    """Read a YAML or JSON spec file into a validated Graph.

    Errors carry the file name; a missing `name` defaults to the file's stem."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"spec is larger than {MAX_SPEC_BYTES} bytes").located(str(path))
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror}").located(str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("spec is not UTF-8 text").located(str(path)) from None
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    try:
        return Graph.from_spec(parse_spec_text(text, fmt=fmt), default_name=path.stem)
    except SpecError as e:
        raise e.located(str(path)) from None
    except RecursionError:
        raise SpecError("spec is nested too deeply").located(str(path)) from None
