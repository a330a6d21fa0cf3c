"""Padding as a padded copy: the guarded reads and scatters of a fused program, lowered for
targets where memory is cheaper than a test per tap.

The IR declares padding once, as a guarded read `{x[idx] if range_guard(idx); fill}` and,
for the scatter derived from it, a kernel guard (graphc/ir.py, docs/design.md). Printed as
it is, a convolution tests its guard at every tap of its innermost loops, and the tiles
(codegen/tiles.py) cannot take it. Here, per program:

- every buffer read under a range guard gets one copy with the fill around it (a `pad`
  kernel: `x.pad[b, c, h, w] = {x[b, c, h - 1, w - 1] if inside; fill}`), written once,
  right before its first guarded reader, and those readers read the copy at the shifted
  index, with no guard. A padded copy holds the fill itself, so `0·w` is still NaN for a
  NaN weight, as in torch;
- every range-guarded scatter into `dx` writes instead into a padded `dx.pad` (zeroed
  where `dx` was zeroed, or right before the scatter), without its guard; its interior is
  then stored into `dx` (or added to it, when `dx` had other contributions).

Both buffers are ordinary temps, so `plan` gives them arena space and frees them after
their last use. Reads at a data-dependent index (an embedding) keep their guard: no box of
loops bounds them. Cortex-M targets do not call this: RAM matters more there than a test.
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from graphc.ir import (ACCUMULATE, ASSIGN, BATCH, REAL, TEMP, Buffer, Kernel, Program,
                       data_dependent, grad_name, grad_of, index_range, index_symbols,
                       range_guard)

PAD = ".pad"


def _dims(buf: Buffer) -> tuple:
    return ((BATCH,) if buf.batched else ()) + tuple(buf.shape)


def _pads(index, dims, extents) -> tuple[tuple[int, int], ...]:
    """(before, after) per axis: how far `index` leaves an array of `dims` over the loops."""
    out = []
    for i, d in zip(index, dims):
        if d == BATCH:
            out.append((0, 0))
            continue
        low, high = index_range(i, extents)
        out.append((max(0, -low), max(0, high - (d - 1))))
    return tuple(out)


def _union(a, b):
    return tuple((max(x0, y0), max(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))


def _padded_buffer(buf: Buffer, name: str, pads) -> Buffer:
    axes = pads[1:] if buf.batched else pads
    shape = tuple(d + lo + hi for d, (lo, hi) in zip(buf.shape, axes))
    return Buffer(name, shape, buf.batched, TEMP)


def _shifted(index, pads):
    return tuple(sp.sympify(i) + lo for i, (lo, _) in zip(index, pads))


def _guarded_reads(kern: Kernel, buffers) -> list[tuple[sp.Piecewise, sp.Indexed]]:
    """The kernel's reads `{x[idx] if range_guard(idx); fill}` at affine indices."""
    extents = dict(kern.loops)
    found = []
    for pw in sorted(kern.body.atoms(sp.Piecewise) | kern.post.atoms(sp.Piecewise),
                     key=sp.default_sort_key):
        if len(pw.args) != 2 or pw.args[1].cond != sp.true:
            continue
        (read, cond), (fill, _) = pw.args
        if not isinstance(read, sp.Indexed) or not fill.is_number:
            continue
        buf = buffers[str(read.base.label)]
        if buf.dtype != REAL or any(data_dependent(i) for i in read.indices):
            continue
        if cond == range_guard(read.indices, _dims(buf), extents):
            found.append((pw, read))
    return found


def _whole_loops(buf: Buffer) -> tuple[tuple, tuple]:
    """Loop symbols and extents covering all of `buf`."""
    dims = _dims(buf)
    syms = tuple(index_symbols(len(dims)))
    return syms, tuple(zip(syms, dims))


def _pad_reads(prog: Program) -> None:
    """Guarded reads from padded copies (see the module's docstring)."""
    # (buffer, fill) -> union of pads, and the kernels reading it guarded
    wanted: dict[tuple[str, sp.Expr], tuple] = {}
    readers: dict[tuple[str, sp.Expr], list[int]] = {}
    for k, kern in enumerate(prog.kernels):
        for pw, read in _guarded_reads(kern, prog.buffers):
            name = str(read.base.label)
            key = (name, pw.args[1].expr)
            pads = _pads(read.indices, _dims(prog.buffers[name]), dict(kern.loops))
            wanted[key] = _union(wanted[key], pads) if key in wanted else pads
            if k not in readers.setdefault(key, []):
                readers[key].append(k)
    inserts: list[tuple[int, Kernel]] = []
    replaced: dict[int, dict] = {}
    ordered = sorted(wanted.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
    for number, (key, pads) in enumerate(ordered):
        name, fill = key
        first, last = readers[key][0], readers[key][-1]
        # The copy is taken once: no kernel may change `name` while it is read.
        if any(prog.kernels[k].out == name for k in range(first, last + 1)):
            continue
        buf = prog.buffers[name]
        # a second fill of the same buffer (max pooling's -inf beside a conv's 0) is numbered
        copy_name = name + PAD if name + PAD not in prog.buffers else f"{name}{PAD}{number}"
        while copy_name in prog.buffers:
            copy_name += "_"
        copy = _padded_buffer(buf, copy_name, pads)
        prog.buffers[copy_name] = copy
        syms, loops = _whole_loops(copy)
        source = tuple(s - lo for s, (lo, _) in zip(syms, pads))
        inside = range_guard(source, _dims(buf), dict(loops))
        body = sp.Piecewise((buf.base[source], inside), (fill, True)) if inside != sp.true \
            else buf.base[source]
        inserts.append((first, Kernel(copy_name, syms, loops, body, ASSIGN,
                                      node=prog.kernels[first].node,
                                      note=f"{name} padded with {fill}")))
        for k in readers[key]:
            for pw, read in _guarded_reads(prog.kernels[k], prog.buffers):
                if (str(read.base.label), pw.args[1].expr) == key:
                    replaced.setdefault(k, {})[pw] = copy.base[_shifted(read.indices, pads)]
    for k, sub in replaced.items():
        kern = prog.kernels[k]
        prog.kernels[k] = replace(kern, body=kern.body.xreplace(sub), post=kern.post.xreplace(sub))
    _insert(prog, inserts, ())


def _insert(prog: Program, inserts: list[tuple[int, Kernel]], origin: tuple) -> None:
    """Each kernel before position k (positions in the program as it was); later ones first,
    so that earlier positions stay valid. `origin` is what fusion's map records for them."""
    for k, kern in sorted(inserts, key=lambda t: t[0], reverse=True):
        prog.kernels.insert(k, kern)
        prog.origins.insert(k, origin)


def _is_zeroing(kern: Kernel, buf: Buffer) -> bool:
    syms = tuple(s for s, _ in kern.loops)
    return kern.mode == ASSIGN and kern.body == 0 and kern.out_index == syms \
        and tuple(e for _, e in kern.loops) == _dims(buf)


def _pad_scatters(prog: Program) -> None:
    """Range-guarded scatters into padded gradients (see the module's docstring)."""
    scatters: dict[str, list[int]] = {}
    for k, kern in enumerate(prog.kernels):
        if kern.mode != ACCUMULATE or kern.guard == sp.true \
                or any(data_dependent(i) for i in kern.out_index):
            continue
        buf = prog.buffers[kern.out]
        if kern.guard == range_guard(kern.out_index, _dims(buf), dict(kern.loops)):
            scatters.setdefault(kern.out, []).append(k)
    plans = []
    for name, ks in sorted(scatters.items()):
        buf = prog.buffers[name]
        first, last = ks[0], ks[-1]
        touched = [k for k, kern in enumerate(prog.kernels)
                   if kern.out == name or name in kern.reads()]
        between = [k for k in touched if first <= k <= last and k not in ks]
        if between:
            continue   # dx is read or written between its scatters: keep the guards
        earlier = [k for k in touched if k < first]
        # dx zeroed right before and nothing else: zero the padded one there instead,
        # and store its interior into dx.
        zero = earlier[-1] if len(earlier) == 1 and \
            _is_zeroing(prog.kernels[earlier[-1]], buf) else None
        pads = ()
        for k in ks:
            kern = prog.kernels[k]
            p = _pads(kern.out_index, _dims(buf), dict(kern.loops))
            pads = _union(pads, p) if pads else p
        plans.append((name, ks, zero, pads))
    inserts: list[tuple[int, Kernel]] = []
    for name, ks, zero, pads in plans:
        buf = prog.buffers[name]
        value = grad_of(name)
        padded_name = grad_name(value + PAD) if value is not None else name + PAD
        while padded_name in prog.buffers:
            padded_name = "_" + padded_name
        padded = _padded_buffer(buf, padded_name, pads)
        prog.buffers[padded_name] = padded
        syms, loops = _whole_loops(padded)
        node = prog.kernels[ks[0]].node
        zeroing = Kernel(padded_name, syms, loops, sp.Integer(0), ASSIGN, node=node,
                         note=f"zero {padded_name}")
        if zero is not None:
            prog.kernels[zero] = replace(zeroing, node=prog.kernels[zero].node)
        else:
            inserts.append((ks[0], zeroing))
        for k in ks:
            kern = prog.kernels[k]
            prog.kernels[k] = replace(kern, out=padded_name,
                                      out_index=_shifted(kern.out_index, pads), guard=sp.true)
        syms, loops = _whole_loops(buf)
        inserts.append((ks[-1] + 1, Kernel(
            name, syms, loops, padded.base[_shifted(syms, pads)],
            ASSIGN if zero is not None else ACCUMULATE, node=node,
            note=f"{name} from the interior of {padded_name}")))
    _insert(prog, inserts, ())


def pad_guards(prog: Program) -> Program:
    """A copy of the fused program `prog` whose range-guarded reads read padded copies and
    whose range-guarded scatters write padded gradients; same values, no guard in the
    loops that do the work."""
    out = Program(dict(prog.buffers), list(prog.kernels),
                  list(prog.origins) if prog.origins is not None
                  else [(k,) for k in range(len(prog.kernels))], prog.in_place)
    _pad_reads(out)
    _pad_scatters(out)
    out.check()
    return out
