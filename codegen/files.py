"""Writing files whole or not at all: generated sources, reports, params, pages."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def write_all(files: dict[Path, str | bytes]) -> None:
    """Write every file or none: each is staged beside its target, and the renames happen
    only once all are fully written. Modes follow the umask like a plain open() (mkstemp's
    0600 would make a generated file private)."""
    umask = os.umask(0)
    os.umask(umask)
    staged = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)
            if isinstance(data, str):
                with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                    f.write(data)
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        # Staged beside their targets, the renames cannot fail for space or permission;
        # a directory in a target's place would stop them half-way, so it is refused first.
        for _, path in staged:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_sources(cmodule, directory: str | os.PathLike) -> tuple[Path, Path]:
    """`<name>.c` and `<name>.h` in `directory`: both or neither."""
    directory = Path(directory)
    c_path, h_path = directory / f"{cmodule.name}.c", directory / f"{cmodule.name}.h"
    write_all({c_path: cmodule.source, h_path: cmodule.header})
    return c_path, h_path
