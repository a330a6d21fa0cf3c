"""Writing `<name>.c` and `<name>.h` to a directory: both or neither."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_sources(cmodule, directory: str | os.PathLike) -> tuple[Path, Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = [(directory / f"{cmodule.name}.c", cmodule.source),
               (directory / f"{cmodule.name}.h", cmodule.header)]
    staged = []
    try:
        for path, text in targets:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
            staged.append((tmp, path))
        for tmp, path in staged:  # renames only once every file is fully written
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return targets[0][0], targets[1][0]
