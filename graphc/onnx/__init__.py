"""ONNX in: a model exported by PyTorch (either exporter) or another framework, as a graphc
Graph whose params start from the model's weights.

    graph = graphc.onnx.load("lenet.onnx")                     # inference, as onnxruntime
    model = graphc.compile(graph)
    graph = graphc.onnx.load("lenet.onnx", loss="softmax_cross_entropy")   # fine-tuning
    graphc.onnx.save(model, "trained.onnx")                    # and back out, for any runtime

An ONNX file is untrusted input: it is read with bounds on its size and on every tensor
before anything is allocated, external data is read only from the model's folder, every
name becomes a safe identifier by one rule (`safe_names`), and each problem is one
SpecError naming the file, the node and the field. The `onnx` package is an optional
dependency (`pip install "graphc[onnx]"`).
"""

from __future__ import annotations

from .exporter import save
from .importer import load
from .ops import SUPPORTED_OPS

__all__ = ["SUPPORTED_OPS", "load", "save"]
