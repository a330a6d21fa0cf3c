"""The optimizers a spec may name, with their fields and torch.optim's defaults: one table,
read by the spec check (graphc/optim.py) and the CLI. No imports, so that `graphc --help`
stays quick (graphc/optim.py needs SymPy for the update formulas)."""

# name -> field defaults; `momentum` is SGD with momentum 0.9 unless given.
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "momentum": {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
}
