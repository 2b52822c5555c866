"""vpop: virtual-population trials of T-cell-engaging bispecific antibodies.

`vpop.run_experiment` runs an in-silico trial from Python (see `vpop.api`); the apps are
`vpop-trial` and `vpop-calibrate` (`vpop.cli`).
"""


def __getattr__(name: str):
    # Imported on first use: `import vpop` stays cheap (no JAX, Hydra) for the model modules.
    if name == "run_experiment":
        from vpop.api import run_experiment

        return run_experiment
    raise AttributeError(f"module 'vpop' has no attribute {name!r}")
