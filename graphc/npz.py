"""Reading .npz files a user names (params, data, worked examples) defensively.

np.load trusts what it reads: a member's header may claim a shape far beyond the bytes
stored (a huge allocation), and a zip bomb is inflated before anyone can look at the names.
NpzReader knows every member's name and declared size from the zip directory before reading
any array, and checks each .npy header against that size before allocating.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import InputError
from .graph import MAX_PARAM_ELEMENTS


# An .npy member is a header (about 128 bytes; this bound is generous) and the raw data.
NPY_HEADER_BYTES = 4096
# The widest element a real array may have in a params file (float64, int64).
MAX_ITEM_BYTES = 8
# No param, and no array of a worked example, is larger than all the params a spec may have.
MAX_NPZ_MEMBER_BYTES = MAX_PARAM_ELEMENTS * MAX_ITEM_BYTES + NPY_HEADER_BYTES


class NpzReader:
    """An .npz file read defensively, for files a user names on the command line.

    Member names and declared sizes (the zip directory) are known before any array is read,
    so a caller can refuse a zip bomb unread; each member's .npy header is checked against
    its declared size before anything is allocated, so a lying header cannot ask for more.
    Every failure (missing, not a zip, truncated, CRC or deflate damage, pickled or
    non-numeric arrays) is an InputError "cannot read <what> from <path>: <why>"."""

    def __init__(self, path: str | os.PathLike | bytes, what: str):
        """`path` names the file, or is the file's bytes (a pickled model's checkpoint)."""
        import io
        import stat
        import zipfile
        self.path, self.what = ("<in memory>" if isinstance(path, bytes) else path), what
        try:
            if isinstance(path, bytes):
                self._zip = zipfile.ZipFile(io.BytesIO(path))
            elif not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO would block, a device never end
                raise self._error("not a regular file")
            else:
                self._zip = zipfile.ZipFile(path)
        except OSError as e:
            raise self._error(e.strerror or str(e)) from None
        except (zipfile.BadZipFile, ValueError, EOFError) as e:
            raise self._error(f"not an .npz file ({e})") from None
        self.members: dict[str, object] = {}   # array name -> ZipInfo
        for info in self._zip.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name in self.members:
                self.close()
                raise self._error(f"array '{name}' is stored twice")
            self.members[name] = info

    def _error(self, why: str) -> InputError:
        return InputError(f"cannot read {self.what} from {self.path}: {why}")

    def size(self, name: str) -> int:
        """The uncompressed bytes the zip directory declares for array `name`."""
        return self.members[name].file_size

    def read(self, name: str) -> np.ndarray:
        import zipfile
        import zlib
        info = self.members[name]
        fmt = np.lib.format
        try:
            with self._zip.open(info) as f:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = fmt.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = fmt.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version} is not supported")
                if dtype.hasobject or dtype.kind not in "biufc":
                    raise ValueError(f"holds {dtype} values, not numbers")
                count = math.prod(shape)
                if count * dtype.itemsize > info.file_size:   # before allocating anything
                    raise ValueError(f"its header claims shape {shape}, more than the "
                                     f"{info.file_size} bytes stored")
                arr = np.empty(count, dtype)
                raw, got = memoryview(arr.view(np.uint8)), 0
                while got < len(raw):   # straight into the array: no second copy
                    k = f.readinto(raw[got:])
                    if not k:
                        raise ValueError("the data is truncated")
                    got += k
                if f.read(1):   # reading to the member's end also checks its CRC
                    raise ValueError("extra bytes after the array data")
                return arr.reshape(shape, order="F" if fortran else "C")
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError) as e:   # RuntimeError: encrypted members
            raise self._error(f"array '{name}': {getattr(e, 'strerror', None) or e}") from None

    def read_bytes(self, name: str, limit: int) -> bytes:
        """The raw bytes of member `name` (not an array), refused unread beyond `limit`."""
        import zipfile
        import zlib
        info = self.members[name]
        if info.file_size > limit:
            raise self._error(f"'{name}' is {info.file_size} bytes uncompressed, more than "
                              f"{limit}; not read")
        try:
            with self._zip.open(info) as f:
                return f.read()   # bounded by the declared size; reading to the end checks the CRC
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError) as e:
            raise self._error(f"'{name}': {getattr(e, 'strerror', None) or e}") from None

    def refuse_larger_than(self, limit: int, why: str) -> None:
        """An InputError, before anything is read, for a member declaring over `limit` bytes."""
        over = next((n for n in self.members if self.size(n) > limit), None)
        if over is not None:
            raise InputError(f"{self.path}: array '{over}' is {self.size(over)} bytes "
                             f"uncompressed, {why}; not read")

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in self.members}

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "NpzReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
