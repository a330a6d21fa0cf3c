"""The shape of the C text: comments in ASCII, and no line longer than 100 characters.

Embedded toolchains, code review tools and memory reports read the files as bytes; a `Σ`
in a comment is three of them. Kernel formulas are written for people (`Σ_{i1}`, `·`) and
become ASCII here, once, for every comment the emitter writes.
"""

from __future__ import annotations

import re
import textwrap

MAX_LINE = 100
CONTINUATION = 8   # extra indent of a broken code line

_ASCII = {"Σ": "sum", "·": "*", "×": "x", "∂": "d", "δ": "d", "−": "-", "≤": "<=",
          "≥": ">=", "→": "->", "…": "...", "²": "^2", "³": "^3", "√": "sqrt", "∞": "inf"}


def ascii_text(text: str) -> str:
    """`text` with the notation's symbols spelled in ASCII; anything else non-ASCII (a
    name cannot hold any, a formula's symbol might) as its Unicode code point."""
    for symbol, word in _ASCII.items():
        text = text.replace(symbol, word)
    return "".join(c if ord(c) < 128 else f"U+{ord(c):04X}" for c in text)


def comment(text: str) -> str:
    """A one-line C comment that nothing can close early (wrapped later if long)."""
    text = ascii_text(text).replace("*/", "* /").replace("/*", "/ *").replace("\n", " ")
    return f"/* {text} */"


def doc(lines: list[str]) -> str:
    """A block comment, one ` * ` line per entry."""
    return "/*\n" + "\n".join((" * " + ascii_text(line).replace("*/", "* /")).rstrip()
                              for line in lines) + "\n */"


def _split_code(line: str, limit: int) -> list[str]:
    """A statement over several lines, broken between tokens: after the rightmost `, `,
    `; ` or `{ ` that fits, else at a space. Continuations are indented further."""
    indent = len(line) - len(line.lstrip())
    out, rest, pad = [], line, " " * (indent + CONTINUATION)
    while len(rest) > limit:
        head = rest[:limit + 1]
        cut = max(head.rfind(", "), head.rfind("; "), head.rfind("{ "))
        cut = cut + 1 if cut > len(pad) else head.rfind(" ")
        if cut <= len(pad):
            break   # one token longer than a line: leave it whole
        out.append(rest[:cut].rstrip())
        rest = pad + rest[cut:].lstrip()
    return out + [rest]


def _split_comment(line: str, limit: int) -> list[str]:
    indent = line[:len(line) - len(line.lstrip())]
    if line.lstrip().startswith("/*") and line.rstrip().endswith("*/"):
        text = line.strip()[2:-2].strip()
        body = textwrap.wrap(text, limit - len(indent) - 3, break_on_hyphens=False)
        return [indent + "/*"] + [f"{indent} * {b}" for b in body] + [indent + " */"]
    # A line inside a block comment: " * text", continued with two more spaces.
    lead = re.match(r"\s*\*\s*", line)[0]
    body = textwrap.wrap(line[len(lead):], limit - len(lead) - 2, break_on_hyphens=False)
    return [lead + body[0]] + [lead + "  " + b for b in body[1:]]


def wrap(text: str, limit: int = MAX_LINE) -> str:
    """Every line of a C file within `limit` characters (preprocessor lines are left
    alone: they hold only names and numbers)."""
    out = []
    in_comment = False
    for line in text.split("\n"):
        stripped = line.lstrip()
        commented = in_comment or stripped.startswith("/*")
        if len(line) > limit and not stripped.startswith("#"):
            out += _split_comment(line, limit) if commented else _split_code(line, limit)
        else:
            out.append(line)
        if commented:
            in_comment = "*/" not in line
    return "\n".join(out)
