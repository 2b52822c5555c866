"""The QSP model: pure JAX functions over explicit parameter pytrees (one module per part)."""

# The meaning of the calibrated parameters. A posterior records the version it was fitted under and
# is refused by another (`vpop.posterior.load`); bump it whenever a parameter keeps its name but
# changes what it does, or the model changes what a posterior's draws would predict.
VERSION = "0.7"
