"""The compiler's stages, called in order from one place:

    Graph -> derive -> Derivation (programs: forward, evaluation, gradients and the
                                   optimizer's update; the interface)
          -> fuse -> plan -> emit -> CModule -> build (graphc/model.py) -> CompiledModel

Each stage takes the previous one's data and nothing upstream of it: codegen sees the
IR (graphc/ir.py), never the Graph.
"""

from __future__ import annotations

from codegen.cmodule import CModule
from codegen.emit import emit
from codegen.padding import pad_guards
from codegen.plan import fuse, plan
from codegen.targets import get_target

from .derive import Derivation, derive
from .graph import Graph


def to_c(graph: Graph, dtype: str, target: str = "c99", params=None,
         max_batch: int | None = None, derivation: Derivation | None = None) -> CModule:
    """The C of `graph` (already validated): its derivation (or the one given), each entry
    point's program fused and planned for the target, then emitted. With `params` (the flat
    param block) the C is inference only, with the params baked in."""
    derivation = derivation or derive(graph)
    programs = {"forward": derivation.forward}
    training = graph.loss is not None and params is None
    if training:
        programs.update(evaluate=derivation.evaluation, gradients=derivation.gradients)
    if training and derivation.update is not None:
        programs["update"] = derivation.update
    tgt = get_target(target)
    planned = {}
    for kind, program in programs.items():
        fused = fuse(program)
        if tgt.padded_copies:
            fused = pad_guards(fused)
        planned[kind] = (fused, plan(fused, tgt.align))
    update = planned.pop("update", None)
    return emit(derivation.interface, planned, update, dtype, params=params, target=target,
                max_batch=max_batch, running=derivation.running if training else None)
