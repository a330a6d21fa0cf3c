"""graphc: a symbolic computation-graph compiler (SymPy gradients, generated C99, verified)."""

__version__ = "0.1.0"

from .errors import GraphcError, InputError, SpecError
from .explain import Explanation, explain
from .graph import Graph
from .builder import Builder
from .model import BoundCall, CompiledModel, compile, generate, load_params, save_params
from .reference import Reference, reference
from .spec import load
from .train import History, evaluate, fit

__all__ = ["BoundCall", "Builder", "CompiledModel", "Explanation", "Graph", "GraphcError",
           "History", "InputError", "Reference", "SpecError", "compile", "evaluate", "explain",
           "fit", "generate", "load", "load_params", "reference", "save_params"]
