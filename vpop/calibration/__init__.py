r"""Bayesian calibration of population parameters to published response and CRS rates (NumPyro).

Each published result is a binomial observation, $k \sim \mathrm{Binomial}(n, \bar p_j(\theta))$,
where $\bar p_j$ is the model's rate over a fixed virtual cohort for that trial (common random
numbers: the same patients at every $\theta$). The rate is the one the trial runner reports, in
expectation: the same simulation (rescue on), the same grading and onset periods, with each
patient's 0/1 endpoint replaced by its expectation over the patient effect that decides it (CRS
susceptibility, response-assessment effect; see `vpop.endpoints`). So the calibration fits the trial
runner's model, not a smoothed cousin of it. Response and any-grade CRS rates are smooth in the
parameters; with rescue on, grade >= 2 and >= 3 CRS rates are counts (steps of 1/patients), since
the rescue history fixes them (`vpop.endpoints`); the emulator smooths over the steps (B06, 0 or 1
of 96 virtual patients at posterior draws, emulated at 0.3-1.7%).
Priors come from the `{nominal, prior: [low, high], unknown: true}` entries of the configs: normal
on the log scale (logit scale for fractions) with the prior range as its central 95%, truncated at +-3 SD. Validation
targets are simulated from the posterior but never enter the likelihood.

Two samplers, chosen by `calibration.method`:
- `simulator`: NUTS differentiates through the simulator itself. Exact but slow on a CPU (a gradient
  over every cohort costs seconds and NUTS needs ~10^4 of them); a patient's rescue history can
  change between nearby parameters, which makes the rates piecewise smooth.
- `emulator` (default): the simulator's smooth rates at a few hundred parameter sets (forward runs
  only, batched) fit a Gaussian-process emulator of logit(rate) against the parameters; NUTS runs on it
  in seconds. Later design rounds concentrate new simulations where the latest posterior lies. The
  emulator's error is reported per target (`emulator.csv`), and every predictive check (`ppc.csv`,
  validation) is simulated with the real simulator at posterior draws, never emulated.

Modules, in the order a calibration uses them: `priors` (the calibrated parameters), `problem`
(targets, cohorts, rates), `likelihood` (the NumPyro model), `emulator` (the Gaussian process),
`design` (the simulated parameter sets behind it), `sampling` (NUTS, predictive runs),
`diagnostics` (convergence, tables, figures) and `run` (`vpop-calibrate`).
"""

from vpop.calibration.problem import Problem, build_problem
from vpop.calibration.run import run

__all__ = ["Problem", "build_problem", "run"]
