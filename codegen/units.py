"""The generated C file as several translation units, for graphc's own build only.

A C compiler runs on one core per file, and a model's C is one file (what embedded users
get). graphc's build (codegen/build.py) compiles it as `count` units at once instead: the
kernels are dealt out by size, each unit holds its kernels and the static helpers they
call, and the entry points stay in the first unit, which declares the kernels it calls in
the others. A kernel that another unit calls loses `static` there (the units compile with
hidden visibility, so the module still exports nothing new).

Every function keeps its text and is compiled under the same flags, and without
-ffast-math or contraction (-std=c99 turns -ffp-contract off) GCC and clang evaluate each
floating-point operation as written, wherever a function is inlined: the units compute
what the one file computes, to the bit (tests/test_units.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A top-level definition's first line: `static void name(`, `float prefix_gradients(`,
# `static const float trained_params[`.
_DEFINITION = re.compile(r"(static )?(?:const )?[A-Za-z_][\w ]*?\b([A-Za-z_]\w*)\s*([(\[])")
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


@dataclass
class _Chunk:
    text: str            # the definition, with the comment lines before it
    name: str | None     # what it defines (None: includes, blank lines, a lone comment)
    static: bool = False
    function: bool = False
    signature: str = ""  # a function's head, up to its `{`


def _chunks(source: str) -> list[_Chunk]:
    """The file as top-level pieces in order: each definition with the comment before it.
    The emitter's layout: a definition starts at column 0 and ends at a line `}` (a
    function) or `};` (a table); comments are `/* ... */` lines or ` * ` blocks."""
    lines = source.split("\n")
    chunks: list[_Chunk] = []
    pending: list[str] = []   # comment lines waiting for their definition
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith(("/*", " *")):
            pending.append(line)
            k += 1
            continue
        match = _DEFINITION.match(line) if line[:1].isalpha() else None
        if match is None:
            chunks.append(_Chunk("\n".join(pending + [line]), None))
        else:
            function = match.group(3) == "("
            end = k
            while lines[end] != ("}" if function else "};") and not (
                    not function and lines[end].endswith(";") and "{" not in lines[end]):
                end += 1
                if end == len(lines):
                    return []   # not the emitter's layout (hand-written C): not split
            text = "\n".join(lines[k:end + 1])
            chunks.append(_Chunk("\n".join(pending + [text]), match.group(2),
                                 bool(match.group(1)), function,
                                 text[:text.index("\n{")] if function else ""))
            k = end
        pending = []
        k += 1
    if pending:
        chunks.append(_Chunk("\n".join(pending), None))
    return chunks


def split(source: str, prefix: str, count: int) -> list[str]:
    """`source` (the C of model `prefix`) as at most `count` translation units; the first
    holds the entry points. One unit (the source itself) when there is nothing to deal."""
    chunks = _chunks(source) if count > 1 else []
    if not chunks:
        return [source]
    named = {c.name: c for c in chunks if c.name}
    refs = {c.name: [w for w in dict.fromkeys(_WORD.findall(c.text)) if w in named and w != c.name]
            for c in chunks if c.name}
    entries = [c.name for c in chunks if c.function and not c.static
               and c.name.startswith(prefix + "_")]
    # The kernels: static functions an entry point calls.
    kernels = list(dict.fromkeys(r for e in entries for r in refs[e]
                                 if named[r].function and named[r].static))

    def closure(roots, stop=()) -> set[str]:
        seen, stack = set(), list(roots)
        while stack:
            n = stack.pop()
            if n in seen or n in stop:
                continue
            seen.add(n)
            stack += refs[n]
        return seen

    cost = {k: sum(named[n].text.count("\n") + 1 for n in closure([k], set(kernels) - {k}))
            for k in kernels}
    if count < 2 or len(kernels) < 2:
        return [source]
    # Largest first, each to the lightest unit (ties: the first); the entry points' unit
    # starts with their lines.
    load = [sum(named[e].text.count("\n") + 1 for e in entries)] + [0] * (count - 1)
    home: dict[str, int] = {}
    for k in sorted(kernels, key=lambda k: (-cost[k], kernels.index(k))):
        unit = min(range(count), key=lambda u: (load[u], u))
        home[k] = unit
        load[unit] += cost[k]
    units = []
    for unit in range(count):
        mine = [k for k in kernels if home[k] == unit]
        if unit and not mine:
            continue
        others = {k for k in kernels if home[k] != unit}
        keep = closure(mine + (entries if unit == 0 else []), others)
        called = {r for n in keep for r in refs[n]} & others
        parts = []
        for c in chunks:
            if c.name is None:
                parts.append(c.text)
            elif c.name in keep:
                # The first unit calls the other units' kernels: external there, not static.
                parts.append(c.text.replace(c.signature, c.signature[len("static "):], 1)
                             if unit and c.name in mine else c.text)
            elif c.name in called:
                parts.append(c.signature[len("static "):] + ";")
        units.append("\n".join(parts))
    return units
