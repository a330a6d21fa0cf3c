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

A read whose last axis steps by s > 1 along a loop (a stride-2 convolution's
`x.pad[b, c, 2h + p, 2w + q]`) is not unit-stride along its output's width, the axis the tiles
would fill their vector lanes along (codegen/tiles.py): such a read gets a packed copy with
one row per tap offset, `x.pad.s2[b, c, h, q, w] = x.pad[b, c, h, 2w + q]`, read unit-stride
as `x.pad.s2[b, c, 2h + p, q, w]` (an im2col along the width alone: the copy is taps/s times
the source, 1.5x for 3 x 3 stride 2, half of it for a 1 x 1 stride-2 shortcut).

All these buffers are ordinary temps, so `plan` gives them arena space and frees them after
their last use. Reads at a data-dependent index (an embedding) keep their guard: no box of
loops bounds them. Cortex-M targets do not call this: RAM matters more there than a test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import sympy as sp

from graphc.ir import (ACCUMULATE, ASSIGN, BATCH, REAL, SUM, TEMP, Buffer, Kernel, Program,
                       data_dependent, grad_name, grad_of, index_range, index_symbols,
                       range_guard)

from .tiles import arithmetic

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


def _strided_reads(kern: Kernel, buffers) -> list[tuple[sp.Indexed, tuple]]:
    """The kernel's reads whose last index is `s·i + e` (s > 1, i a loop of its own, e
    affine in other loops), each with its packing key (buffer, s, i's extent, the least
    value of e, e's step g, how many values e takes): what a packed copy holds."""
    if kern.mode not in (SUM, ACCUMULATE) or kern.guard != sp.true \
            or not arithmetic(kern.body):
        return []   # only the tiles (sums and scatters of plain arithmetic) read the copy
    extents = dict(kern.loops)
    found = []
    for read in kern.accesses():
        buf = buffers[str(read.base.label)]
        last = sp.expand(read.indices[-1])
        if buf.dtype != REAL or data_dependent(last) or not buf.shape \
                or any(read.has(p) for p in kern.body.atoms(sp.Piecewise)):
            continue
        for i in sorted(last.free_symbols, key=str):
            s = last.coeff(i)
            rest = last - s * i
            if not (s.is_Integer and s > 1 and isinstance(extents.get(i), int)
                    and extents[i] > 1 and i not in rest.free_symbols
                    and all(i not in sp.sympify(x).free_symbols for x in read.indices[:-1])):
                continue
            low, high = index_range(rest, extents)
            coeffs = [int(rest.coeff(t)) for t in rest.free_symbols]
            step = math.gcd(*coeffs) if coeffs else 1
            found.append((read, (str(read.base.label), int(s), extents[i], low, step,
                                 (high - low) // step + 1), i, rest))
            break
    return found


def _pack_strides(prog: Program) -> None:
    """Strided reads from packed copies (see the module's docstring)."""
    wanted: dict[tuple, list[int]] = {}
    for k, kern in enumerate(prog.kernels):
        for _, key, _, _ in _strided_reads(kern, prog.buffers):
            if k not in wanted.setdefault(key, []):
                wanted[key].append(k)
    inserts: list[tuple[int, Kernel]] = []
    replaced: dict[int, dict] = {}
    for key, readers in sorted(wanted.items()):
        name, stride, width, low, step, taps = key
        first, last = readers[0], readers[-1]
        if any(name in prog.kernels[k].writes() for k in range(first, last + 1)):
            continue   # the copy is taken once: no kernel may change `name` meanwhile
        buf = prog.buffers[name]
        copy_name = f"{name}.s{stride}"
        while copy_name in prog.buffers:
            copy_name += "_"
        # [..., taps, width]: the tap axis dropped when there is one (a 1 x 1 convolution)
        tap_axis = (taps,) if taps > 1 else ()
        copy = Buffer(copy_name, tuple(buf.shape[:-1]) + tap_axis + (width,), buf.batched,
                      TEMP)
        prog.buffers[copy_name] = copy
        syms, loops = _whole_loops(copy)
        t = syms[-2] if taps > 1 else sp.Integer(0)
        source = syms[:len(_dims(buf)) - 1] + (stride * syms[-1] + low + step * t,)
        inserts.append((first, Kernel(copy_name, syms, loops, buf.base[source], ASSIGN,
                                      node=prog.kernels[first].node,
                                      note=f"{name} packed by stride {stride}")))
        for k in readers:
            for read, key_, i, rest in _strided_reads(prog.kernels[k], prog.buffers):
                if key_ == key:
                    tap = ((rest - low) / step,) if taps > 1 else ()
                    replaced.setdefault(k, {})[read] = \
                        copy.base[tuple(read.indices[:-1]) + tap + (i,)]
    for k, sub in replaced.items():
        kern = prog.kernels[k]
        prog.kernels[k] = replace(kern, body=kern.body.xreplace(sub), post=kern.post.xreplace(sub))
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
    _pack_strides(out)
    out.check()
    return out
