"""The optimizers a spec may name, with their fields and torch.optim's defaults: one table,
read by the spec check (graphc/optim.py) and the CLI. No imports, so that `graphc --help`
stays quick (graphc/optim.py needs SymPy for the update formulas)."""

# name -> its fields with torch.optim's defaults; `momentum` is SGD with momentum 0.9
# unless given. Every optimizer also takes `clip_grad_norm` (CLIP_DEFAULT).
OPTIMIZERS: dict[str, dict] = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "momentum": {"lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
             "amsgrad": False},
    "adamw": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
              "amsgrad": False},
    "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False},
    "adagrad": {"lr": 0.01, "lr_decay": 0.0, "weight_decay": 0.0,
                "initial_accumulator_value": 0.0, "eps": 1e-10},
    "adamax": {"lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "nadam": {"lr": 0.002, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
              "momentum_decay": 0.004, "decoupled_weight_decay": False},
}
