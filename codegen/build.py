"""Build generated C into a Python extension module through cffi, cached by content hash.

The cache is one flat directory of `.so` files named `_graphc_<name>_<key[:16]><EXT_SUFFIX>`.
The key is a sha256 of everything that can change the binary (sources, cdef, compiler and
its version, the exact commands, Python's ABI, graphc's and cffi's versions), so an entry is
never stale and never needs invalidating. Each builder works in its own temporary directory
and publishes with an atomic `os.replace`, so concurrent builders need no lock: both succeed
and one whole entry remains (STYLE item 12).

A big model's C compiles as several translation units at once, one per core
(codegen/units.py): the module computes the same bits, and the C users get stays one file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import pathlib
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import graphc
from graphc import __version__   # graphc's package loads its modules on use: no cycle
from graphc.errors import GraphcError

from .units import split

# cffi and sysconfig are imported only to build: loading a prepared module (below) needs
# neither, and a warm compile in a fresh process should not pay for them. A built module
# needs only cffi's backend, `_cffi_backend`, whose version is the package's (cffi refuses
# to run otherwise).

# Flags for the generated model source. `extra_flags` are added after these (and to the link),
# so callers can compile under `-Wall -Wextra -Wpedantic -Werror` or sanitizers.
_MODEL_FLAGS = ("-std=c99", "-O3", "-fPIC")
# GCC's -O2 with the vectorizer's dynamic cost model runs the tiled kernels as fast as -O3
# (W1-W4 within noise; -O2's default cheap model halves W1) and compiles W3's C in 0.38 s
# instead of 0.67 s, most of a cold build. -ftree-vectorize for GCC before 12.
# -fno-tree-loop-distribute-patterns: once GCC knows a tile's strides (from its callers), it
# turns the loops that zero and store the tile's sums into memset and memcpy calls, and the
# sums then stay in memory, loaded and stored at every product. ResNet-8's forward at batch
# 64 took 86 ms of a Zen 1 core with them, 64 ms without; W1-W4 and DS-CNN did not change.
_GCC_MODEL_FLAGS = ("-std=c99", "-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic",
                    "-fno-tree-loop-distribute-patterns", "-fPIC")
# cffi's wrapper includes Python.h and is not pedantic-clean C99 (it casts object pointers to
# function pointers), so it is compiled apart, with neither -std=c99 nor the caller's flags.
# -O1: it compiles in 0.15 s where -O3 took 0.27 s (every cold build pays it), and a call
# through it measured the same (213 ns against 216 ns for an empty forward).
_WRAPPER_FLAGS = ("-O1", "-fPIC")
# graphc's own extension modules (build_extension): Python's C API is not pedantic C99.
_EXTENSION_FLAGS = ("-O2", "-fPIC", "-shared") + (("-undefined", "dynamic_lookup")
                                                 if sys.platform == "darwin" else ())
# macOS leaves the Python symbols to be resolved when the module is loaded.
_LINK_FLAGS = ("-shared",) + (("-undefined", "dynamic_lookup") if sys.platform == "darwin" else ())

# A model's C of at least this many lines compiles as several translation units at once, one
# per core up to MAX_UNITS (codegen/units.py): ResNet-8's 6,700 lines take GCC 5 s in one.
# Smaller ones gain less than the helpers each unit repeats cost.
SPLIT_LINES = 2000
MAX_UNITS = 4

_WRAPPER = "_cffi_module"   # file stem of cffi's generated wrapper inside the build dir
_BUILT = "module.so"        # output name inside the build dir, renamed on publishing
_STDERR_LIMIT = 4000


class CompileError(GraphcError):
    """The C compiler rejected generated code: an internal error, reported with the
    command and the compiler's own message."""


@dataclass(frozen=True)
class BuildResult:
    """A loaded model module and where it came from."""
    ffi: object    # the cffi FFI of the loaded module (module.ffi)
    lib: object    # module.lib: the model's functions
    path: str      # the .so file in the cache
    key: str       # sha256 hex of everything the binary depends on
    cached: bool   # True when an existing cache entry was loaded


def cache_dir() -> pathlib.Path:
    """$GRAPHC_CACHE_DIR if set, else $XDG_CACHE_HOME/graphc, else ~/.cache/graphc."""
    explicit = os.environ.get("GRAPHC_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")   # the XDG spec treats empty as unset
    return (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "graphc"


def c_compiler() -> tuple[str, ...]:
    """The C compiler command: $CC split as a shell would, else cc."""
    return tuple(shlex.split(os.environ.get("CC") or "cc"))


def check_strict(name: str, source: str, header: str, flags: tuple[str, ...]) -> bool:
    """Compile `<name>.c` (which includes `<name>.h`) to an object file in a temporary
    directory under `flags` (warnings as errors), -O2 (some warnings, such as
    -Wmaybe-uninitialized and array bounds, come from the optimizer) and -c. True when it compiles
    cleanly, False when there is no C compiler to ask; a CompileError naming the compiler's
    first error line when it does not compile."""
    cc = c_compiler()
    if not cc or shutil.which(cc[0]) is None:
        return False
    command = [*cc, *flags, "-O2", "-c", f"{name}.c", "-o", f"{name}.o"]
    try:
        with tempfile.TemporaryDirectory(prefix="graphc-check-") as tmp:
            pathlib.Path(tmp, f"{name}.c").write_text(source, encoding="utf-8")
            pathlib.Path(tmp, f"{name}.h").write_text(header, encoding="utf-8")
            run = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    except OSError as e:
        raise GraphcError(f"cannot test-compile the generated C for '{name}': "
                          f"{e.strerror or e}") from None
    if run.returncode == 0:
        return True
    lines = [line.strip() for line in (run.stderr + run.stdout).splitlines() if line.strip()]
    first = next((line for line in lines if ": error" in line),
                 next((line for line in lines if "error" in line),
                      lines[0] if lines else f"{shlex.join(command)} exited with {run.returncode}"))
    raise CompileError(f"the generated C for '{name}' does not compile cleanly: {first}")


def compile_flags(cc: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The default flags the model source is compiled with by `cc` (default `c_compiler()`),
    before any extra_flags."""
    cc = cc or c_compiler()
    return _GCC_MODEL_FLAGS if _is_gcc(cc) else _MODEL_FLAGS


@functools.lru_cache(maxsize=None)
def _is_gcc(cc: tuple[str, ...]) -> bool:
    """GCC itself, not clang or another compiler that answers to its flags."""
    try:
        run = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in run.stdout and "clang" not in run.stdout.lower()


# Loaded modules by .so path (which embeds the key): a second build() in this process returns
# at once. The lock keeps two threads from building and loading the same model twice.
_loaded: dict[str, object] = {}
_lock = threading.Lock()


def build(name: str, source: str, header: str, cdef: str, *,
          extra_flags: tuple[str, ...] = (), machine: str = "",
          glue: tuple[str, str] = ("", "")) -> BuildResult:
    """Compile `<name>.c`/`<name>.h` with a cffi wrapper exposing `cdef`, cached by content.

    `name` is the model's validated C prefix; `source` does `#include "<name>.h"`.
    `machine` (a host target's) names the instruction set that flags like -march=native
    select: the same text with the same flags is a different binary on another CPU.
    `glue`: (declarations, definitions) of C the wrapper adds and exposes beside the
    model's functions (codegen/fastcall.py's); the C the model's users get has none.
    """
    import sysconfig
    from . import openmp
    cc = c_compiler()
    threaded = openmp.uses_openmp(tuple(extra_flags))
    if threaded:   # the thread count is set per model from Python (codegen/openmp.py)
        cdef += openmp.API
    cdef += glue[0]
    units = split(source, name, _unit_count(source))
    commands = _commands(cc, name, tuple(extra_flags), len(units))
    key = _key(name, source, header, cdef + glue[1], _compiler_id(cc) + "\n" + machine,
               commands)
    modname = f"_graphc_{name}_{key[:16]}"   # distinct per model and version in sys.modules
    cache = cache_dir()
    so_path = str(cache / (modname + sysconfig.get_config_var("EXT_SUFFIX")))
    with _lock:
        module = _loaded.get(so_path)
        cached = module is not None or os.path.exists(so_path)
        if module is None:
            if cached:
                module = _load_or_none(modname, so_path)
                if module is None:   # a damaged entry (truncated, emptied): build it again
                    _discard(so_path)
                    cached = False
            if module is None:
                _compile(commands, name, modname, units, header, cdef, cache, so_path,
                         (openmp.API if threaded else "") + glue[1])
                module = _load(modname, so_path)   # a fresh build that fails to load is a bug
            _loaded[so_path] = module
    return BuildResult(module.ffi, module.lib, so_path, key, cached)


def build_extension(stem: str, source: str, includes: tuple[str, ...] = (),
                    version: str = ""):
    """The CPython extension module `stem` (its `PyInit_<stem>`) compiled from the C text
    `source`, cached like the models (by the source, `version`: what else its binary
    depends on, the compiler and Python's ABI) and loaded once per process. Finding it
    built costs a stat of the compiler, not a run of it: a warm compile in a fresh process
    loads it."""
    cc = c_compiler()
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    command = (*cc, *_EXTENSION_FLAGS, *(f"-I{i}" for i in includes), f"{stem}.c",
               "-o", _BUILT)
    key = _digest(stem, source, version, repr(command), _compiler_stamp(cc), suffix)
    cache = cache_dir()
    so_path = str(cache / f"{stem}_{key[:16]}{suffix}")
    with _lock:
        module = _loaded.get(so_path)
        if module is None and os.path.exists(so_path):
            module = _load_or_none(stem, so_path)
            if module is None:   # damaged: build it again
                _discard(so_path)
        if module is None:
            _build_extension(stem, source, command, cache, so_path)
            module = _load(stem, so_path)
        _loaded[so_path] = module
    return module


def _build_extension(stem: str, source: str, command: tuple[str, ...], cache: pathlib.Path,
                     so_path: str) -> None:
    """Compile `source` with `command` (and Python's headers) in a private directory and
    publish the .so atomically, as _compile does a model's."""
    import sysconfig
    tmp = _build_dir(cache, stem)
    command = (*command, f"-I{sysconfig.get_paths()['include']}")
    try:
        (tmp / f"{stem}.c").write_text(source, encoding="utf-8")
        run = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0:
            raise CompileError(f"C compiler failed (exit {run.returncode}) building graphc's "
                               f"{stem}:\n$ {shlex.join(command)}\n"
                               f"{_trim(run.stderr + run.stdout)}")
        os.replace(tmp / _BUILT, so_path)
    except OSError as e:
        raise _cache_error(cache, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_dir(cache: pathlib.Path, stem: str) -> pathlib.Path:
    """A private temporary directory in `cache` for one build (`remove_stale` knows its
    name), the cache made first if need be."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix=f"{stem}.tmp-", dir=cache))
    except OSError as e:   # a regular file in the way, or no permission
        raise _cache_error(cache, e) from None


def _cache_error(cache: pathlib.Path, e: OSError) -> GraphcError:
    why = "it is not a directory" if isinstance(e, FileExistsError) else e.strerror or str(e)
    return GraphcError(f"cannot use the build cache {cache}: {why}; set GRAPHC_CACHE_DIR "
                       "to a writable directory")


# A build directory untouched this long was left by a builder that was killed (kill -9, a
# power cut); a younger one may belong to a concurrent builder, whose compiler steps touch it
# every few seconds at most.
STALE_SECONDS = 3600


def remove_stale(cache: pathlib.Path, now: float | None = None) -> None:
    """Remove the build directories (`*.tmp-*`) and staged files (`.*.tmp`) that dead
    builders left in `cache`, once they are STALE_SECONDS old. Never fails."""
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        build_dir = name.startswith("_graphc_") and ".tmp-" in name
        staged = name.startswith("._graphc_") and name.endswith(".tmp")
        if not (build_dir or staged):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < STALE_SECONDS:
                continue
            if build_dir and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif staged and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass   # gone already (another builder cleaned it), or not ours to remove


def _unit_count(source: str) -> int:
    """How many translation units to compile `source` as: one per available core, at most
    MAX_UNITS, and one per SPLIT_LINES lines."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_UNITS, source.count("\n") // SPLIT_LINES))


def _unit_file(name: str, k: int, count: int) -> str:
    return f"{name}.c" if count == 1 else f"{name}.{k}.c"


def _commands(cc: tuple[str, ...], name: str, extra_flags: tuple[str, ...],
              units: int = 1) -> tuple[tuple[str, ...], ...]:
    """The compiler commands, run inside the build dir: one per unit of the model's C, the
    wrapper's, then the link. They use only relative paths there, so they are the same for
    every build and can go into the key verbatim."""
    import sysconfig
    include = sysconfig.get_paths()["include"]
    # Units: the kernels one unit calls in another are not static (codegen/units.py); hidden,
    # they stay inside the module, and the units do not warn of the helpers they leave unused.
    apart = ("-fvisibility=hidden", "-Wno-unused-function") if units > 1 else ()
    sources = [_unit_file(name, k, units) for k in range(units)]
    objects = [s[:-2] + ".o" for s in sources]
    return (
        *[(*cc, *compile_flags(cc), *extra_flags, *apart, "-c", s, "-o", o)
          for s, o in zip(sources, objects)],
        (*cc, *_WRAPPER_FLAGS, f"-I{include}", "-c", f"{_WRAPPER}.c", "-o", f"{_WRAPPER}.o"),
        (*cc, *_LINK_FLAGS, *extra_flags, *objects, f"{_WRAPPER}.o", "-o", _BUILT, "-lm"),
    )


@functools.lru_cache(maxsize=None)
def _compiler_id(cc: tuple[str, ...]) -> str:
    """The compiler's resolved path and first `--version` line; asked once per process."""
    path = shutil.which(cc[0])
    if path is None:
        raise CompileError(f"C compiler {cc[0]!r} not found; install one or set $CC")
    run = subprocess.run([*cc, "--version"], capture_output=True, text=True)
    return path + "\n" + (run.stdout.splitlines() or [""])[0]


def _key(name: str, source: str, header: str, cdef: str, compiler: str,
         commands: tuple[tuple[str, ...], ...]) -> str:
    import sysconfig
    return _digest(name, source, header, cdef, compiler, repr(commands),
                   sysconfig.get_config_var("EXT_SUFFIX"), __version__, _cffi_version())


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)   # length-prefixed: unambiguous
    return digest.hexdigest()


def _compile(commands: tuple[tuple[str, ...], ...], name: str, modname: str, units: list[str],
             header: str, cdef: str, cache: pathlib.Path, so_path: str,
             declarations: str = "") -> None:
    """Build in a private temporary directory and publish the .so atomically;
    `declarations` are C prototypes the wrapper needs beside the model's header."""
    tmp = _build_dir(cache, modname)
    remove_stale(cache)
    keep = os.environ.get("GRAPHC_KEEP_SOURCES") == "1"
    kept = cache / f"{modname}.src"
    try:
        try:
            for k, unit in enumerate(units):
                (tmp / _unit_file(name, k, len(units))).write_text(unit, encoding="utf-8")
            (tmp / f"{name}.h").write_text(header, encoding="utf-8")
        except OSError as e:   # a full disk or quota
            raise _cache_error(cache, e) from None
        import cffi
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        # compiler_verbose=False: no "generating ..." line on stdout.
        ffi.set_source(modname, f'#include "{name}.h"\n{declarations}', compiler_verbose=False)
        ffi.emit_c_code(str(tmp / f"{_WRAPPER}.c"))
        *objects, link = commands
        # The objects compile at once: the wrapper is a sixth of a cold build, and the
        # model's C, in units, keeps the cores busy for the rest.
        procs = [subprocess.Popen(c, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for c in objects]
        results = []
        for command, proc in zip(objects, procs):
            out, err = proc.communicate()
            results.append((command, proc.returncode, out, err))
        if all(code == 0 for _, code, _, _ in results):
            run = subprocess.run(link, cwd=tmp, capture_output=True, text=True)
            results.append((link, run.returncode, run.stdout, run.stderr))
        for command, code, out, err in results:
            if code != 0:
                where = (f"sources kept in {kept}" if keep
                         else "set GRAPHC_KEEP_SOURCES=1 to keep the sources")
                raise CompileError(
                    f"C compiler failed (exit {code}) building '{name}' ({where}):\n"
                    f"$ {shlex.join(command)}\n{_trim(err + out)}")
        # A concurrent builder of the same key may overwrite our file with its identical one
        # (or we theirs); rename is atomic, so readers only ever see a whole file.
        try:
            os.replace(tmp / _BUILT, so_path)
        except OSError as e:
            raise _cache_error(cache, e) from None
    finally:
        if keep:
            try:
                os.replace(tmp, kept)
            except OSError:   # an earlier or concurrent build already kept its sources
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def _cffi_version() -> str:
    import _cffi_backend
    return _cffi_backend.__version__


def _trim(text: str) -> str:
    text = text.strip()
    if len(text) <= _STDERR_LIMIT:
        return text
    return text[:_STDERR_LIMIT] + f"\n... ({len(text) - _STDERR_LIMIT} more characters)"


# ---------------------------------------------------------------- prepared modules
#
# A warm `graphc.compile` should not derive and emit again only to find the .so built. The
# prepared cache maps a key of everything generation depends on (the canonical spec, dtype,
# target, graphc's own sources, SymPy's version, the compiler's identity and flags) to the
# pickled CModule and its .so. It lives beside the .so files and is trusted like them: a
# hand-edited cache entry can run code either way.
#
# A warm compile in a fresh process should take a few milliseconds, so unpickling imports
# only the light modules the pickle names (codegen/cmodule.py, codegen/plan.py), not the
# emitter.

# Bumped whenever the pickle's layout or the classes it names move (2: CModule and Entry
# moved from codegen.emit to codegen.cmodule), so older entries are missed, never misread.
_PREPARED_FORMAT = "2"


def _sources(directory: str) -> list[str]:
    """Every .py file under `directory`, recursively (not __pycache__)."""
    found = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != "__pycache__":
                    found += _sources(entry.path)
            elif entry.name.endswith(".py"):
                found.append(entry.path)
    return found


@functools.lru_cache(maxsize=None)
def _source_fingerprint() -> str:
    """sha256 of graphc's and codegen's Python sources: what the generated text depends on.
    Their contents, not their sizes and mtimes: a same-size edit whose mtime survived (a
    copied or reproducibly built tree) must not reuse a stale CModule. About 1 ms a process."""
    digest = hashlib.sha256()
    for package in (os.path.dirname(graphc.__file__), os.path.dirname(__file__)):
        root = os.path.dirname(package)
        for path in sorted(_sources(package)):
            with open(path, "rb") as f:
                data = f.read()
            name = os.path.relpath(path, root).encode()
            digest.update(len(name).to_bytes(8, "little") + name
                          + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _compiler_stamp(cc: tuple[str, ...]) -> str:
    """The compiler's path, size and mtime: cheap, and changes when the compiler does."""
    path = shutil.which(cc[0])
    if path is None:
        raise CompileError(f"C compiler {cc[0]!r} not found; install one or set $CC")
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def prepared_key(*parts: str) -> str:
    import sympy
    cc = c_compiler()
    # EXTENSION_SUFFIXES[0] names this interpreter's ABI as EXT_SUFFIX does, without
    # loading sysconfig's data (half a millisecond).
    return _digest(_PREPARED_FORMAT, *parts, _source_fingerprint(), sympy.__version__,
                   _cffi_version(), repr(cc), _compiler_stamp(cc),
                   importlib.machinery.EXTENSION_SUFFIXES[0])


def _prepared_path(key: str) -> pathlib.Path:
    return cache_dir() / f"_graphc_prepared_{key[:32]}.pickle"


def load_prepared(key: str):
    """(cmodule, BuildResult) for a prepared key whose module is built, else None."""
    import pickle
    try:
        with open(_prepared_path(key), "rb") as f:
            cmodule, so_path, build_key = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            ImportError):
        return None   # absent, half-written by an older graphc, or unreadable: prepare again
    with _lock:
        module = _loaded.get(so_path)
        if module is None:
            if not os.path.exists(so_path):
                return None
            modname = pathlib.Path(so_path).name.split(".")[0]
            module = _load_or_none(modname, so_path)
            if module is None:   # damaged: not prepared (build() replaces the .so)
                return None
            _loaded[so_path] = module
    return cmodule, BuildResult(module.ffi, module.lib, so_path, build_key, True)


def store_prepared(key: str, cmodule, built: BuildResult) -> None:
    """Record a built module. Its entries keep their memory plans but not their kernel
    programs: SymPy objects are slow to unpickle, and running the model does not need them
    (`graphc.generate` gives the full CModule)."""
    import dataclasses
    import pickle
    from .files import write_all
    light = dataclasses.replace(cmodule, entries={
        k: dataclasses.replace(e, program=None) for k, e in cmodule.entries.items()})
    try:
        write_all({_prepared_path(key): pickle.dumps((light, built.path, built.key))})
    except OSError:
        pass   # a read-only cache still works, only more slowly


def _load(modname: str, path: str):
    from .openmp import runtime_defaults
    spec = importlib.util.spec_from_file_location(modname, path)
    # If this module brings in the OpenMP runtime, how it waits. module_from_spec is where
    # an extension module is opened (dlopen), and with it the runtime, which reads its
    # settings then: exec_module only runs the module's init.
    with runtime_defaults():
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _load_or_none(modname: str, path: str):
    """The module of a cache entry, or None when the file is damaged: cut short (a full
    disk, a partial copy of the cache) or not a loadable module at all."""
    if _elf_truncated(path):
        return None
    try:
        return _load(modname, path)
    except (ImportError, OSError):
        return None


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass   # a concurrent builder removed or replaced it already
    except OSError as e:
        raise _cache_error(pathlib.Path(path).parent, e) from None


def _elf_truncated(path: str) -> bool:
    """True for an ELF file that ends before its loadable segments or its section table do.
    dlopen maps such a file and then dies of SIGBUS touching the missing pages, instead of
    failing, so it is checked first (a few microseconds). Other files are left to dlopen."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) \
                    or head[5] not in (1, 2):
                return False
            wide, end = head[4] == 2, "<" if head[5] == 1 else ">"
            if wide and len(head) < 64:
                return True
            if wide:
                phoff, shoff = struct.unpack_from(end + "QQ", head, 0x20)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "4H", head, 0x36)
            else:
                phoff, shoff = struct.unpack_from(end + "II", head, 0x1C)
                phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "4H", head, 0x2A)
            if phentsize < (56 if wide else 32) or phoff + phnum * phentsize > size \
                    or shoff + shnum * shentsize > size:
                return True
            f.seek(phoff)
            table = f.read(phnum * phentsize)
    except OSError:
        return False   # unreadable: dlopen says why
    for k in range(phnum):
        at = k * phentsize
        if wide:
            offset, = struct.unpack_from(end + "Q", table, at + 8)
            filesz, = struct.unpack_from(end + "Q", table, at + 32)
        else:
            offset, = struct.unpack_from(end + "I", table, at + 4)
            filesz, = struct.unpack_from(end + "I", table, at + 16)
        if offset + filesz > size:
            return True
    return False
