"""Data sets for training: arrays named after a graph's inputs, and a held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import GraphcError, InputError
from .model import batch_arrays
from .npz import NpzReader

DIGITS_IMAGES = ((64,), (8, 8), (1, 8, 8))
DIGITS_LABELS = (10,)


def check_arrays(graph, data, dtype, where: str) -> tuple[dict[str, np.ndarray], int]:
    """One array per graph input, all of one leading length, converted to `dtype`; errors
    are InputErrors that start with `where` (the argument or file they come from).

    `data` is a dict of arrays named after the inputs, or a tuple or list of arrays, one per
    input in the spec's order (`(X, y)`)."""
    names = list(graph.inputs)
    if isinstance(data, (tuple, list)):
        if len(data) != len(names):
            raise InputError(f"{where}: {len(data)} array{'s' * (len(data) != 1)} for "
                             f"{len(names)} input{'s' * (len(names) != 1)}: give one per input, "
                             f"in this order: {', '.join(names)}")
        data = dict(zip(names, data))
    if not isinstance(data, Mapping):
        raise InputError(f"{where} must be a dict of arrays named after the inputs, or a tuple "
                         f"of arrays in their order ({', '.join(names)}), got "
                         f"{type(data).__name__}")
    shapes = {k: v.shape for k, v in graph.inputs.items()}
    bounds = graph.index_bounds()
    indices = {k: bounds.get(k) for k, v in graph.inputs.items() if v.dtype == "int32"}
    try:
        with np.errstate(over="ignore"):   # values beyond float32 become inf: refused below
            arrays, n = batch_arrays(list(graph.inputs), shapes, data, dtype, set(graph.inputs),
                                     indices)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    # One NaN or inf poisons every param at its first step, and training would report a
    # nan loss and save nan params without complaint. (Also values beyond float32's range.)
    for name, a in arrays.items():
        if name not in indices and not np.all(np.isfinite(a)):
            bad = int(np.count_nonzero(~np.isfinite(a)))
            raise InputError(f"{where}: input '{name}' holds {bad} non-finite value"
                             f"{'s' * (bad != 1)} (nan or inf in {np.dtype(dtype).name})")
    return arrays, n


def load_dataset(source: str, graph) -> dict[str, np.ndarray]:
    """`"digits"` (scikit-learn's bundled 8x8 digits) or a `.npz` file with one array per input."""
    source = str(source)
    if source == "digits":
        return _digits(graph)
    if source.endswith(".npz"):
        return _npz(Path(source), graph)
    raise GraphcError(f"unknown data set {source!r}: give 'digits' or a .npz file "
                      "with one array per input")


def _digits(graph) -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GraphcError("the digits data set comes with scikit-learn: "
                          "pip install scikit-learn") from None
    d = load_digits()  # bundled with scikit-learn: no download
    images = d.data / 16.0  # pixel values are 0..16
    labels = np.eye(10)[d.target]
    # Inputs are matched by shape and dtype: the spec names them as it likes.
    out: dict[str, np.ndarray] = {}
    taken: dict[str, str] = {}  # images | labels -> the input that gets them
    for name, value in graph.inputs.items():
        if value.dtype == "int32" and value.shape == ():
            kind, array = "labels", d.target.astype(np.int32)   # class indices 0..9
        elif value.dtype == "int32" and value.shape in DIGITS_IMAGES:
            # the pixels' 17 levels (0..16) as tokens, for an embedding of 17 rows
            kind, array = "images", d.data.astype(np.int32).reshape((-1,) + value.shape)
        elif value.shape in DIGITS_IMAGES and value.dtype != "int32":
            kind, array = "images", images.reshape((-1,) + value.shape)
        elif value.shape == DIGITS_LABELS and value.dtype != "int32":
            kind, array = "labels", labels
        else:
            raise GraphcError(f"the digits data set does not fit input '{name}' of shape "
                              f"{list(value.shape)}{' (int32)' * (value.dtype == 'int32')}: "
                              "it has images of shape [64] (or [8, 8], or [1, 8, 8] for a "
                              "convolution; int32 for the pixel levels 0 to 16 as tokens), "
                              "and labels one-hot of shape [10] or as int32 class indices "
                              "of shape []")
        if kind in taken:
            raise GraphcError(f"inputs '{taken[kind]}' and '{name}' would both get the digits "
                              f"{kind}: give the images and the labels one input each")
        taken[kind] = name
        out[name] = array
    return out


def _npz(path: Path, graph) -> dict[str, np.ndarray]:
    # NpzReader: truncated, damaged or renamed files are one InputError, and an array's
    # header cannot make it allocate more than the file declares.
    with NpzReader(path, "data") as z:
        arrays = z.read_all()
    arrays, _ = check_arrays(graph, arrays, np.float64, str(path))
    return arrays


def hold_out_last(arrays: Mapping[str, np.ndarray], n: int, fraction, where: str = "data"
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, validation): the last `fraction` of the examples held out, before any
    shuffling (Keras's `validation_split` rule, so the split is the same for every seed)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction < 1:
        raise InputError(f"validation_split must lie strictly between 0 and 1, got {fraction!r}")
    keep = int(n * (1 - fraction))
    if keep == 0 or keep == n:
        raise InputError(f"validation_split {fraction} of the {n} examples in {where} leaves "
                         f"{'no training' if keep == 0 else 'no validation'} examples")
    return ({k: a[:keep] for k, a in arrays.items()}, {k: a[keep:] for k, a in arrays.items()})


def split(data: Mapping[str, np.ndarray], test_fraction: float = 0.2,
          seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train, test): a seeded split, stratified by class when an array is one-hot."""
    if not 0 < test_fraction < 1:
        raise GraphcError(f"the test fraction must lie strictly between 0 and 1, got {test_fraction}")
    arrays = {k: np.asarray(v) for k, v in data.items()}
    n = len(next(iter(arrays.values())))
    rng = np.random.default_rng(seed)
    labels = next((a.argmax(axis=1) if _one_hot(a) else a for a in arrays.values()
                   if _one_hot(a) or _class_indices(a)), None)
    if labels is None:
        test = rng.permutation(n)[:round(n * test_fraction)]
    else:  # the same share of each class, so small test sets keep the class balance
        test = np.concatenate([rng.permutation(idx)[:round(len(idx) * test_fraction)]
                               for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))])
    is_test = np.zeros(n, bool)
    is_test[test] = True
    if is_test.all() or not is_test.any():
        raise GraphcError(f"a test fraction of {test_fraction} of {n} examples leaves "
                          f"{'no training' if is_test.all() else 'no test'} examples")
    return ({k: a[~is_test] for k, a in arrays.items()}, {k: a[is_test] for k, a in arrays.items()})


def _class_indices(a: np.ndarray) -> bool:
    """Labels as integers, one per example (an int32 input of per-example shape [])."""
    return a.ndim == 1 and a.dtype.kind in "iu"


def _one_hot(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] > 1 and bool(np.all((a == 0) | (a == 1))) \
        and bool(np.all(a.sum(axis=1) == 1))
