"""What `codegen.emit.emit` produces: the C texts, the entry points and their memory plans.

Kept apart from the emitter, with no imports of its own, so that unpickling a prepared
module (codegen/build.py) does not import the printer, the tiles or SymPy's code rewriting:
a warm `graphc.compile` in a fresh process needs only these classes and codegen.plan's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graphc.ir import Program

    from .plan import MemoryPlan


@dataclass(frozen=True)
class KernelCall:
    """One call in an entry point's body: which C function computes the entry program's
    kernel `index`, and what each of its array arguments points to."""
    index: int                             # position in the entry's (fused) program
    function: str                          # the static C function, e.g. "h1_forward"
    text: str                              # the call as printed, without the ';'
    arguments: tuple[tuple[str, str, str], ...]   # (C parameter, buffer, pointer expression)


@dataclass(frozen=True)
class Entry:
    """One C entry point: its name, what it reads and writes, and its work arena's plan."""
    kind: str                  # forward | gradients | evaluate | train_step | predict
    c_name: str
    program: Program           # fused; None in a prepared module (codegen/build.py)
    memory: MemoryPlan
    inputs: tuple[str, ...]    # graph inputs it reads, in declaration order
    outputs: tuple[str, ...]   # forward outputs it writes
    loss_buffer: str | None = None
    work_before: int = 0       # work elements in front of the program's arena (train_step's grads)
    takes_step: bool = False   # a `uint32_t step` after n: which dropout masks it draws
    # train_step: the update's temporaries, where the gradients' arena was. The update runs
    # only for n >= 1, when that arena holds at least fixed + per_example elements.
    update_work: int = 0

    def work_fixed(self) -> int:
        return self.work_before + max(self.memory.fixed,
                                      self.update_work - self.memory.per_example)


@dataclass(frozen=True)
class CModule:
    """A model's generated C (source, header, cffi declarations) and the layout its caller
    needs: params, optimizer state, input and output shapes, the work arena per batch."""
    name: str
    dtype: str
    source: str
    header: str
    cdef: str
    entries: dict[str, Entry]
    param_offsets: dict[str, int]
    params_size: int
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    optimizer: dict | None = None
    state_size: int = 0
    state_offsets: dict[str, int] = field(default_factory=dict)   # "step" and the slots
    baked_params: bool = False
    target: str = "c99"        # codegen/targets.py: how contractions print, the header's note
    max_batch: int | None = None  # the batch static memory is planned for, if stated
    # The map from the IR to the text (explain shows it; nothing re-reads the C):
    functions: dict[str, str] = field(default_factory=dict)   # C function -> its text
    calls: dict[str, tuple[KernelCall, ...]] = field(default_factory=dict)   # by entry kind
    # The params block's front [0, trainable_size) is what the optimizer trains (its state
    # slots have this size); the params after it are declared trainable: false. `running`:
    # those the train step updates as running statistics, with their momentum.
    trainable_size: int = 0
    running: dict[str, float] = field(default_factory=dict)
    # Inputs of int32_t indices (an embedding's rows, class indices); the rest are `dtype`.
    input_dtypes: dict[str, str] = field(default_factory=dict)
    # Optimizer state: each slot's size (1 for the step count, each hyperparameter and the
    # scalar slots; trainable_size for per-element ones); the slots that are
    # hyperparameters, with what each is; what each slot starts at when not 0 (what
    # `<name>_init_state` writes).
    state_sizes: dict[str, int] = field(default_factory=dict)
    hyperparameters: dict[str, str] = field(default_factory=dict)
    state_start: dict[str, float] = field(default_factory=dict)
    element_slots: tuple[str, ...] = ()   # the slots of one element per trainable element
    # Entry kind -> the smallest batch at which it runs a kernel in an OpenMP team (host
    # builds; kinds that never do are absent): below it a call needs no thread count.
    parallel_from: dict[str, int] = field(default_factory=dict)
    # Entry kind -> the iterations of its kernels' loop nests in one call, (fixed, per
    # example): how long a call is, roughly (a call this short keeps the GIL, graphc/model.py).
    work: dict[str, tuple[int, int]] = field(default_factory=dict)

    def input_dtype(self, name: str) -> str:
        """The NumPy dtype of an input's array: "int32", or the model's."""
        return self.input_dtypes.get(name, self.dtype)

    def initial_state(self):
        """What `<name>_init_state` writes, as a float64 NumPy array (for a C harness
        that takes its state as data)."""
        import numpy as np
        state = np.zeros(self.state_size)
        for slot, value in self.state_start.items():
            at = self.state_offsets[slot]
            state[at:at + self.state_sizes[slot]] = value
        return state

    def work_fixed(self) -> int:
        return max(e.work_fixed() for e in self.entries.values())

    def work_per_example(self) -> int:
        return max(e.memory.per_example for e in self.entries.values())

    def work_elements(self, n: int) -> int:
        """Enough work for every entry point at batch size n: `<NAME>_WORK_SIZE(n)`."""
        return self.work_fixed() + self.work_per_example() * n
