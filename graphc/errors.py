"""Errors a user can cause. Each one names where the mistake is: file, node, field."""

from __future__ import annotations


class GraphcError(Exception):
    """Base of every error graphc raises on purpose (the CLI exits 2 on these)."""


class SpecError(GraphcError, ValueError):
    """A mistake in a spec or builder call, located by file, node and field."""

    def __init__(self, message: str, *, node: str | None = None, field: str | None = None,
                 file: str | None = None):
        self.message, self.node, self.field, self.file = message, node, field, file
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.node is not None:
            where.append(f"node '{self.node}'")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return (": ".join(where) + ": " if where else "") + self.message

    def located(self, file: str) -> "SpecError":
        """The same error with the spec's file name attached."""
        return SpecError(self.message, node=self.node, field=self.field, file=file)


class InputError(GraphcError, ValueError):
    """Arrays passed to a model that do not fit its inputs or params."""


class NonFiniteError(GraphcError, FloatingPointError):
    """Training reached a NaN or infinite loss or gradient (`fit(on_nonfinite="raise")`):
    where, and the first tensor that was not finite."""

    def __init__(self, message: str, *, epoch: int, step: int, tensor: str):
        super().__init__(message)
        self.epoch, self.step, self.tensor = epoch, step, tensor   # 1-based; a value's name
