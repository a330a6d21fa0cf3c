"""A model in one file, to resume training from: `model.save(path)`, `graphc.load_model(path)`.

The file is a zip archive (an .npz, so `np.load(path)` opens it) with:

    header.json        {"format": "graphc-checkpoint", "version": 1, "dtype": "float32",
                        "target": "host", "baked_params": false, "spec": {...}}
    params/<name>.npy  each param, in the model's dtype and the param's shape
    state/<slot>.npy   each optimizer state slot (`cmodule.state_offsets`: "step", the step
                       count that also draws the dropout masks, then the slots of the
                       optimizer), the slot's stretch of the state block as a 1-D array
    initial/<name>.npy the values an imported model's params start from (Graph.initial),
                       float64; only for such models

Slots are carried by name, whatever the optimizer keeps in them, so a new slot needs no
change here. Every array is plain .npy data: nothing is unpickled. Loading treats the file
as untrusted: the header is parsed as a spec is (duplicate keys and NaN refused), the spec
validated by Graph.from_spec (names are checked identifiers before any C is made), every
member's declared size bounded before it is read, and every array's dtype, shape and
finiteness checked before anything is copied into the model.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .dtypes import DTYPES
from .errors import InputError, SpecError
from .ir import STEP_COUNT
from .npz import NPY_HEADER_BYTES, NpzReader
from .spec import MAX_SPEC_BYTES

FORMAT = "graphc-checkpoint"
VERSION = 1
HEADER = "header.json"
HEADER_FIELDS = ("format", "version", "dtype", "target", "baked_params", "spec")
SECTIONS = ("params", "state", "initial")   # the array members' folders
# The header is the spec plus a few fields: a spec file's bound, and room for the fields.
MAX_HEADER_BYTES = MAX_SPEC_BYTES + 4096
# A fixed time stamp on every member: the same model state gives the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


def state_slots(cmodule) -> dict[str, tuple[int, int]]:
    """slot -> (offset, size) in the state block."""
    return {slot: (at, cmodule.state_sizes[slot]) for slot, at in cmodule.state_offsets.items()}


# ---------------------------------------------------------------- writing

def header_text(model) -> str:
    """The header of `model`'s checkpoints (the same for every save of one model)."""
    header = {"format": FORMAT, "version": VERSION, "dtype": model.dtype.name,
              "target": model.cmodule.target, "baked_params": bool(model.cmodule.baked_params),
              "spec": model.graph.to_spec()}
    try:
        return json.dumps(header, allow_nan=False, default=_plain)
    except (TypeError, ValueError) as e:
        raise InputError(f"model '{model.name}' cannot be saved: its spec is not plain "
                         f"JSON ({e})") from None


def _plain(value):
    """NumPy scalars in a builder-made spec, as the Python numbers they stand for."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not a number, string or list")


def checkpoint_bytes(header: str, params: dict[str, np.ndarray], state: dict[str, np.ndarray],
                     initial: dict[str, np.ndarray]) -> bytes:
    """The file's bytes: the header, then each array as an .npy member."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo(HEADER, _EPOCH), header.encode("utf-8"))
        for section, arrays in (("params", params), ("state", state), ("initial", initial)):
            for name, array in arrays.items():
                with z.open(zipfile.ZipInfo(f"{section}/{name}.npy", _EPOCH), "w") as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_checkpoint(data: bytes, path: str | os.PathLike) -> None:
    """Written whole or not at all (staged beside `path`, then renamed over it)."""
    from codegen.files import write_all
    try:
        write_all({Path(path): data})
    except OSError as e:
        raise InputError(f"cannot write checkpoint to {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------- reading

@contextmanager
def open_checkpoint(path: str | os.PathLike | bytes):
    """A checkpoint (a path or its bytes), its header, spec, params and initial values
    checked: yields (graph, header, params, read_state), where `read_state(model)` gives the
    state slots checked against the compiled model. `graphc.load_model` compiles between."""
    with NpzReader(path, "checkpoint") as z:
        where = z.path
        header = _read_header(z, where)
        graph = _graph(header["spec"], where)
        arrays = _sections(z, where)
        dtype = np.dtype(header["dtype"])
        params = _read_params(z, where, graph, arrays["params"], dtype)
        graph.initial = _read_initial(z, where, graph, arrays["initial"])
        yield graph, header, params, lambda model: _read_state(z, where, model,
                                                                arrays["state"], dtype)


def _fail(where, what: str, why: str) -> InputError:
    return InputError(f"{where}: {what}: {why}")


def _read_header(z: NpzReader, where) -> dict:
    from .spec import parse_spec_text
    from codegen.targets import TARGETS
    if HEADER not in z.members:
        raise _fail(where, HEADER, f"missing: not a graphc checkpoint (members: "
                    f"{', '.join(list(z.members)[:5]) or 'none'})")
    raw = z.read_bytes(HEADER, MAX_HEADER_BYTES)
    try:
        header = parse_spec_text(raw.decode("utf-8"), fmt="json")   # duplicates, NaN refused
    except UnicodeDecodeError:
        raise _fail(where, HEADER, "not UTF-8 text") from None
    except SpecError as e:
        raise _fail(where, HEADER, e.message) from None
    except RecursionError:
        raise _fail(where, HEADER, "nested too deeply") from None
    if not isinstance(header, dict):
        raise _fail(where, HEADER, "must be a JSON object")
    unknown = sorted(set(header) - set(HEADER_FIELDS))
    missing = [f for f in HEADER_FIELDS if f not in header]
    if header.get("format") != FORMAT:
        raise _fail(where, f"{HEADER}: field 'format'", f"must be {FORMAT!r}, got "
                    f"{header.get('format')!r}: not a graphc checkpoint")
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _fail(where, f"{HEADER}: field 'version'", f"must be a positive integer, got "
                    f"{version!r}")
    if version > VERSION:
        raise _fail(where, f"{HEADER}: field 'version'", f"version {version} is newer than "
                    f"this graphc reads ({VERSION}): upgrade graphc")
    if missing or unknown:
        field = missing[0] if missing else unknown[0]
        raise _fail(where, f"{HEADER}: field '{field}'", "missing" if missing else
                    f"unknown field (fields: {', '.join(HEADER_FIELDS)})")
    if header["dtype"] not in DTYPES:
        raise _fail(where, f"{HEADER}: field 'dtype'", f"must be one of {', '.join(DTYPES)}, "
                    f"got {header['dtype']!r}")
    if header["target"] not in TARGETS:
        raise _fail(where, f"{HEADER}: field 'target'", f"must be one of {', '.join(TARGETS)}, "
                    f"got {header['target']!r}")
    if not isinstance(header["baked_params"], bool):
        raise _fail(where, f"{HEADER}: field 'baked_params'", "must be true or false")
    return header


def _graph(spec, where):
    from .graph import Graph
    try:
        return Graph.from_spec(spec)
    except SpecError as e:
        raise e.located(f"{where}: {HEADER}: spec") from None
    except RecursionError:
        raise SpecError("nested too deeply").located(f"{where}: {HEADER}: spec") from None


def _sections(z: NpzReader, where) -> dict[str, dict[str, str]]:
    """section -> {array name: member name}; any other member is refused."""
    out: dict[str, dict[str, str]] = {s: {} for s in SECTIONS}
    for member in z.members:
        if member == HEADER:
            continue
        section, _, name = member.partition("/")
        if section not in out or not name:
            raise _fail(where, f"member '{member}'", f"unknown (a checkpoint holds {HEADER} "
                        f"and arrays under {', '.join(s + '/' for s in SECTIONS)})")
        out[section][name] = member
    return out


def _same_names(where, section: str, have: dict, want, what: str) -> None:
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing:
        raise _fail(where, f"{section}/{missing[0]}", f"missing ({what}: {', '.join(want)})")
    if extra:
        raise _fail(where, f"{section}/{extra[0]}", f"unknown ({what}: "
                    f"{', '.join(want) or 'none'})")


def _read_array(z: NpzReader, where, member: str, shape: tuple, dtype) -> np.ndarray:
    """Member `member`, refused unread when its declared size exceeds what `shape` needs,
    then checked: exactly `dtype` and `shape`, finite."""
    need = math.prod(shape) * np.dtype(dtype).itemsize
    if z.size(member) > need + NPY_HEADER_BYTES:
        raise _fail(where, member, f"must be {np.dtype(dtype).name} of shape {shape}, but its "
                    f"member is {z.size(member)} bytes uncompressed; not read")
    array = z.read(member)
    if array.dtype != dtype or array.shape != tuple(shape):
        raise _fail(where, member, f"must be {np.dtype(dtype).name} of shape {tuple(shape)}, "
                    f"got {array.dtype} {array.shape}")
    if not np.all(np.isfinite(array)):
        raise _fail(where, member, "holds non-finite values")
    return array


def _read_params(z, where, graph, members, dtype) -> dict[str, np.ndarray]:
    _same_names(where, "params", members, list(graph.params), f"model '{graph.name}' has params")
    return {p: _read_array(z, where, members[p], v.shape, dtype)
            for p, v in graph.params.items()}


def _read_initial(z, where, graph, members) -> dict[str, np.ndarray]:
    unknown = [n for n in members if n not in graph.params]
    if unknown:
        raise _fail(where, f"initial/{unknown[0]}", f"not a param of model '{graph.name}'")
    return {p: _read_array(z, where, members[p], graph.params[p].shape, np.float64)
            for p in members}


def _read_state(z, where, model, members, dtype) -> dict[str, np.ndarray]:
    slots = state_slots(model.cmodule)
    _same_names(where, "state", members, list(slots), f"the optimizer of model "
                f"'{model.name}' keeps")
    state = {slot: _read_array(z, where, members[slot], (size,), dtype)
             for slot, (_, size) in slots.items()}
    if STEP_COUNT in state:   # the C reads it as a uint32_t count (and dropout's draws)
        count = float(state[STEP_COUNT][0])
        if not (0 <= count < 2.0 ** 32 and count == int(count)):
            raise _fail(where, f"state/{STEP_COUNT}", f"must hold a step count (a whole "
                        f"number from 0 to 2^32 - 1), got {count!r}")
    _check_hyperparameters(where, model.cmodule.optimizer, state)
    return state


def _check_hyperparameters(where, optimizer: dict | None, state: dict) -> None:
    """The hyperparameter slots hold what the spec's checks accept (a negative lr, or
    1 - beta = 0, would make the first step write NaN into every param)."""
    if optimizer is None:
        return
    from .optim import check_optimizer, field_value, hyperparameters
    for field, slots in hyperparameters(optimizer).items():
        value = field_value(field, [float(state[slot][0]) for slot in slots])
        try:
            check_optimizer({**optimizer, field: value})
        except SpecError as e:
            raise _fail(where, f"state/{slots[0]}", f"{field}: {e.message}") from None

