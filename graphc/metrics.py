"""Metrics by name, computed on the outputs `model.evaluate` returns.

Each metric compares the loss node's prediction (an output) with its target (an input):
accuracies for the classification losses, errors for `mse`. A metric is a sum over examples
of a per-example value, accumulated batch by batch, then divided by the example count
(rmse: the root of the data set's mse, as Keras's RootMeanSquaredError).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError

# loss op -> the metrics that mean something for it
CLASSIFIER_LOSSES = ("softmax_cross_entropy", "bce_with_logits")
METRICS_FOR = {"softmax_cross_entropy": ("accuracy", "top_k_accuracy"),
               "bce_with_logits": ("accuracy",),
               "mse": ("mae", "mse", "rmse")}
METRICS = ("accuracy", "top_k_accuracy", "mae", "mse", "rmse")
TOP_K_DEFAULT = 5
_TOP_K_NAME = re.compile(r"top_(\d+)_accuracy")


@dataclass(frozen=True)
class Metric:
    key: str         # what History and `evaluate` call it
    kind: str        # one of METRICS
    k: int = 0       # top_k_accuracy's k


@dataclass(frozen=True)
class LossPair:
    """Where the metrics look: the loss op, its prediction (an output), its target (an input)."""
    op: str
    prediction: str
    target: str


def loss_pair(graph) -> LossPair | None:
    """The loss's prediction and target, when the prediction is an output (so `evaluate`
    returns it) and the target an input."""
    node = graph.values.get(graph.loss) if graph.loss else None
    if node is None or node.op not in METRICS_FOR:
        return None
    prediction, target = node.inputs[:2]
    if prediction in graph.outputs and graph.values[target].kind == "input":
        return LossPair(node.op, prediction, target)
    return None


def resolve_metrics(graph, metrics) -> tuple[LossPair | None, list[Metric]]:
    """The metrics asked for: names (`"accuracy"`, `"top_k_accuracy"` (k=5),
    `"top_3_accuracy"`, `"mae"`, ...) or `("top_k_accuracy", k)` pairs. None: accuracy for a
    classifier, nothing otherwise."""
    pair = loss_pair(graph)
    if metrics is None:
        return pair, ([Metric("accuracy", "accuracy")]
                       if pair and pair.op in CLASSIFIER_LOSSES else [])
    if isinstance(metrics, (str, tuple)):
        metrics = [metrics]
    out: list[Metric] = []
    for item in metrics:
        metric = _parse(item)
        if pair is None:
            raise InputError(f"metric '{metric.key}' compares the loss's prediction with its "
                             f"target: that needs a loss op ({', '.join(METRICS_FOR)}) whose "
                             f"prediction is an output and whose target is an input")
        if metric.kind not in METRICS_FOR[pair.op]:
            raise InputError(f"metric '{metric.key}' does not apply to a '{pair.op}' loss "
                             f"(its metrics: {', '.join(METRICS_FOR[pair.op])})")
        if metric.key in (m.key for m in out):
            raise InputError(f"metric '{metric.key}' is asked for twice")
        out.append(metric)
    return pair, out


def _parse(item) -> Metric:
    if isinstance(item, tuple) and len(item) == 2 and item[0] == "top_k_accuracy":
        k = item[1]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"metric ('top_k_accuracy', k): k must be a positive integer, "
                             f"got {k!r}")
        return Metric(f"top_{int(k)}_accuracy", "top_k_accuracy", int(k))
    if isinstance(item, str):
        if item == "top_k_accuracy":
            return Metric(item, item, TOP_K_DEFAULT)
        match = _TOP_K_NAME.fullmatch(item)
        if match and int(match.group(1)) >= 1:
            return Metric(item, "top_k_accuracy", int(match.group(1)))
        if item in METRICS:
            return Metric(item, item)
    raise InputError(f"unknown metric {item!r} (known: {', '.join(METRICS)}, top_<k>_accuracy, "
                     "or ('top_k_accuracy', k))")


def batch_sums(metrics: list[Metric], pair: LossPair, outputs: dict,
               batch: dict) -> list[float]:
    """Per metric, the sum over this batch's examples of its per-example value."""
    prediction, target = outputs[pair.prediction], batch[pair.target]
    return [float(_per_example(m, pair.op, prediction, target).sum()) for m in metrics]


def finish(metrics: list[Metric], sums: list[float], n: int) -> dict[str, float]:
    return {m.key: float(np.sqrt(s / n)) if m.kind == "rmse" else s / n
            for m, s in zip(metrics, sums)}


def _per_example(metric: Metric, op: str, prediction: np.ndarray,
                 target: np.ndarray) -> np.ndarray:
    """Per example, the mean of the metric over its elements (or its positions)."""
    if metric.kind == "accuracy":
        right = _correct(op, prediction, target)
    elif metric.kind == "top_k_accuracy":
        labels = _labels(prediction, target)
        label_logit = np.take_along_axis(prediction, labels[..., None], axis=-1)
        # In the top k when fewer than k logits are strictly greater: a tie counts as a hit.
        right = (prediction > label_logit).sum(axis=-1) < metric.k
    else:
        diff = prediction - target
        right = np.abs(diff) if metric.kind == "mae" else diff * diff
    return right.reshape(len(right), -1).mean(axis=1)


def _labels(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Class indices: an integer target (the logits' shape without the class axis) as it is,
    one-hot or probability rows by their largest entry."""
    return (target if target.ndim == logits.ndim - 1 else target.argmax(axis=-1)).astype(np.intp)


def _correct(op: str, logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    if op == "softmax_cross_entropy":
        return logits.argmax(axis=-1) == _labels(logits, target)
    return (logits > 0) == (target > 0.5)   # bce_with_logits: each element a yes/no
