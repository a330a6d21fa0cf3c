"""Reading spec files: YAML (safely) or JSON, rejecting duplicate keys."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .graph import Graph
from .onnx import load as load_onnx

MAX_SPEC_BYTES = 1 << 20


def _where(path: tuple, key: Any) -> dict:
    """`node` and `field` naming a key of the mapping at `path` (keys from the top; only
    the first three matter)."""
    path = tuple(str(p) for p in path)
    if path and path[0] in ("inputs", "params", "nodes"):
        if len(path) == 1:
            return {"node": str(key), "field": path[0]}
        return {"node": path[1], "field": path[2] if len(path) > 2 else str(key)}
    if path and path[0] == "optimizer":
        return {"node": "optimizer", "field": path[1] if len(path) > 1 else str(key)}
    return {"node": None, "field": path[0] if path else str(key)}


class _UniqueKeys:
    """A SafeLoader's checks: it refuses duplicate keys (plain YAML keeps the last one
    silently), keys that are not scalars, and aliases that expand beyond the size limit."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text   # libyaml's marks have no buffer: a key's text is sliced from here

    def construct_document(self, node):
        visits, todo = 0, [((), node)]
        while todo:  # iterative: aliases may make the node graph deep, shared or cyclic
            path, n = todo.pop()
            visits += 1
            if visits > MAX_SPEC_BYTES:
                raise SpecError(f"spec expands to more than {MAX_SPEC_BYTES} values "
                                "(through YAML aliases)")
            if isinstance(n, yaml.SequenceNode):
                todo.extend(((path + (k,))[:3], v) for k, v in enumerate(n.value))
            elif isinstance(n, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, value_node in n.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        # '<<' merges (explicit keys override merged ones): check its mappings
                        todo.append((path, value_node))
                        continue
                    line = key_node.start_mark.line + 1
                    if not isinstance(key_node, yaml.ScalarNode):
                        kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                        start, end = key_node.start_mark, key_node.end_mark
                        text = self.text[start.index:end.index]
                        raise SpecError(f"a key must be a plain name, not a {kind} (line {line})",
                                        **_where(path, text))
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise SpecError(f"duplicate key {key!r} (line {line}; first at line "
                                        f"{seen[key]})", **_where(path, key))
                    seen[key] = line
                    todo.append(((path + (key,))[:3], value_node))
        return super().construct_document(node)


# libyaml's parser when PyYAML was built with it (the wheels are): it reads ResNet-8's spec
# in 9 ms where the pure-Python one takes 94 ms, most of a warm compile. Both construct
# through SafeConstructor, so the same YAML gives the same values.
class _UniqueKeyLoader(_UniqueKeys, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    pass


class _Pairs(list):
    """A JSON object as its (key, value) pairs, before the duplicate check."""


def _json_unique(value: Any, path: tuple = ()) -> Any:
    if isinstance(value, _Pairs):
        out = {}
        for k, v in value:
            if k in out:
                raise SpecError(f"duplicate key {k!r}", **_where(path, k))
            out[k] = _json_unique(v, path + (k,))
        return out
    if isinstance(value, list):
        return [_json_unique(v, path + (k,)) for k, v in enumerate(value)]
    return value


def _reject_constant(token):
    raise SpecError(f"{token} is not a valid number in a spec")


def parse_spec_text(text: str, *, fmt: str = "yaml") -> Any:
    if fmt == "json":
        try:
            return _json_unique(json.loads(text, object_pairs_hook=_Pairs,
                                           parse_constant=_reject_constant))
        except json.JSONDecodeError as e:
            raise SpecError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except SpecError:
            raise
        except ValueError as e:   # an integer of more than 4300 digits
            raise SpecError(f"invalid JSON: {e}") from None
    try:
        loader = _UniqueKeyLoader(text)   # a SafeLoader: no Python objects
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if "nesting depth" in (e.problem or ""):   # libyaml from 0.2.5 stops at 1000 levels
            raise SpecError(f"spec is nested too deeply{where}") from None
        raise SpecError(f"invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}") from None
    except SpecError:
        raise
    except ValueError as e:   # an integer of more than 4300 digits (Python refuses to parse it)
        raise SpecError(f"invalid YAML: {e}") from None


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _read_bounded(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_SPEC_BYTES. Opened without blocking (a
    FIFO would wait for a writer forever) and checked after the open, through the file
    itself (a symlink may point anywhere, /dev/zero never ends and reports size 0)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "a special file")
            raise SpecError(f"cannot read spec: it is {kind}, not a regular file"
                            ).located(str(path))
        chunks, left = [], MAX_SPEC_BYTES + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is larger than {MAX_SPEC_BYTES} bytes").located(str(path))
    return data


def load(path: str | os.PathLike) -> Graph:
    """Read a YAML or JSON spec file into a validated Graph; an `.onnx` file is imported
    (graphc.onnx.load: inference, its weights as the params' start).

    Errors carry the file name; a missing `name` defaults to the file's stem."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    try:
        data = _read_bounded(path)
        text = data.decode("utf-8")
    except OSError as e:
        raise SpecError(f"cannot read spec: {e.strerror or e}").located(str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("spec is not UTF-8 text").located(str(path)) from None
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    try:
        return Graph.from_spec(parse_spec_text(text, fmt=fmt), default_name=path.stem)
    except SpecError as e:
        raise e.located(str(path)) from None
    except RecursionError:
        raise SpecError("spec is nested too deeply").located(str(path)) from None
