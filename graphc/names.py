"""Which names a spec may use. Names reach the C file only after this check."""

from __future__ import annotations

import keyword
import re

from codegen.cnames import C_KEYWORDS

from .errors import SpecError

IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
MAX_NAME_LENGTH = 63  # C99 guarantees 63 significant characters for internal identifiers


# Formulas are parsed as Python expressions, so a value named `assert` or `lambda` could
# never be used in one. Soft keywords (match, case, type) parse as names and stay allowed.
PYTHON_KEYWORDS = frozenset(keyword.kwlist)


def check_name(name: object, *, what: str, node: str | None = None, field: str | None = None) -> str:
    """Return `name` if it is a safe identifier; raise a SpecError saying why not."""
    if not isinstance(name, str):
        hint = (" (YAML reads unquoted yes/no/on/off/true/false/null as values: quote the name)"
                if isinstance(name, bool) or name is None else "")
        raise SpecError(f"{what} must be a string, got {name!r}{hint}", node=node, field=field)
    if not IDENTIFIER.match(name):
        raise SpecError(f"{what} {name!r} is not a valid identifier (a letter, then letters, "
                        "digits or '_')", node=node, field=field)
    if len(name) > MAX_NAME_LENGTH:
        raise SpecError(f"{what} {name!r} is longer than {MAX_NAME_LENGTH} characters",
                        node=node, field=field)
    if name in C_KEYWORDS:
        raise SpecError(f"{what} {name!r} is a C keyword; choose another name",
                        node=node, field=field)
    if name in PYTHON_KEYWORDS:
        raise SpecError(f"{what} {name!r} is a Python keyword, which formulas cannot refer "
                        "to; choose another name", node=node, field=field)
    return name
