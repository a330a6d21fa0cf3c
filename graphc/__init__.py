"""graphc: a symbolic computation-graph compiler (SymPy gradients, generated C99, verified)."""

__version__ = "0.1.0"

from .errors import GraphcError, InputError, SpecError
from .graph import Graph
from .builder import Builder
from .model import CompiledModel, compile, generate, load_params, save_params
from .reference import Reference, reference
from .spec import load

__all__ = ["Builder", "CompiledModel", "Graph", "GraphcError", "InputError", "Reference",
           "SpecError", "compile", "generate", "load", "load_params", "reference",
           "save_params"]
