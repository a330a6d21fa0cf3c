"""The MLPerf Tiny reference models of this folder in PyTorch, written after the reference
architectures (github.com/mlcommons/tiny, benchmark/training), not from the specs: the
oracle tests/test_tiny.py and `python -m benchmarks.tiny` compare graphc's C with.

    forward(name, params, x, training=False) -> logits (the autoencoder: its reconstruction)
    varied_params(graph, seed) -> params with every batch norm and bias drawn at random

`params` maps the specs' param names to torch tensors: conv weight K<layer> and bias
k<layer>, batch norm g (weight), s (shift), m and v (running statistics) <layer>, dense W
and b. Padding as the specs have it (symmetric, torch's; their headers say where Keras's
'same' differs). Dropout is left out: evaluation mode passes through it, and the tests
compare training mode only on the models without it.
"""

from __future__ import annotations

MODELS = ("ds_cnn", "resnet8", "mobilenet_v1_025", "autoencoder")


def forward(name: str, P: dict, x, *, training: bool = False):
    """The reference architectures in torch.nn.functional, by the specs' param names:
    conv weight K<layer>, bias k<layer>; batch norm g, s, m, v<layer>."""
    import torch.nn.functional as F

    def bn(h, n):
        return F.batch_norm(h, P[f"m{n}"], P[f"v{n}"], P[f"g{n}"], P[f"s{n}"],
                            training=training, momentum=0.1, eps=1e-5)

    def conv(h, n, **kw):
        return F.conv2d(h, P[f"K{n}"], P[f"k{n}"], **kw)

    if name == "ds_cnn":
        h = F.relu(bn(conv(x, "0", stride=2, padding=(5, 1)), "0"))
        for i in range(1, 5):
            h = F.relu(bn(conv(h, f"d{i}", padding=1, groups=64), f"d{i}"))
            h = F.relu(bn(conv(h, f"p{i}"), f"p{i}"))
        h = F.avg_pool2d(h, (25, 5)).flatten(1)
        return F.linear(h, P["W"], P["b"])
    if name == "resnet8":
        h = F.relu(bn(conv(x, "0", padding=1), "0"))
        y = F.relu(bn(conv(h, "1a", padding=1), "1a"))
        h = F.relu(h + bn(conv(y, "1b", padding=1), "1b"))
        for s in (2, 3):
            y = F.relu(bn(conv(h, f"{s}a", stride=2, padding=1), f"{s}a"))
            y = bn(conv(y, f"{s}b", padding=1), f"{s}b")
            h = F.relu(conv(h, f"{s}s", stride=2) + y)
        return F.linear(F.avg_pool2d(h, 8).flatten(1), P["W"], P["b"])
    if name == "mobilenet_v1_025":
        h = F.relu(bn(conv(x, "0", stride=2, padding=1), "0"))
        widths = [16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]
        strides = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
        for i, (c, s) in enumerate(zip(widths, strides), 1):
            h = F.relu(bn(conv(h, f"d{i}", stride=s, padding=1, groups=h.shape[1]), f"d{i}"))
            h = F.relu(bn(conv(h, f"p{i}"), f"p{i}"))
        return F.linear(F.avg_pool2d(h, 3).flatten(1), P["W"], P["b"])
    h = x
    for i in range(1, 10):
        h = F.relu(bn(F.linear(h, P[f"W{i}"], P[f"b{i}"]), str(i)))
    return F.linear(h, P["W10"], P["b10"])


def varied_params(graph, seed: int = 0) -> dict:
    """float64 params for comparisons: the initializers' (drawn with `seed`), with every
    batch norm's statistics, scale and shift and every bias drawn at random, so that no
    layer sits at torch's initial values (where a zero shift and relu make scales cancel,
    and the running statistics do nothing)."""
    import numpy as np
    from graphc.reference import Reference
    rng = np.random.default_rng(seed)
    ref = Reference(graph, dtype="float64", seed=seed)
    out = ref.get_params()
    for v in graph.nodes.values():
        if v.op == "batch_norm":
            _, w, b, mean, var = v.inputs
            c = graph.params[w].shape
            out[w] = rng.uniform(0.5, 1.5, c)
            out[b] = rng.normal(0.0, 0.2, c)
            out[mean] = rng.normal(0.0, 0.2, c)
            out[var] = rng.uniform(0.5, 2.0, c)
        elif v.op in ("conv2d", "dense") and len(v.inputs) == 3:
            out[v.inputs[2]] = rng.normal(0.0, 0.1, graph.params[v.inputs[2]].shape)
    return out
