"""In-silico trials: arms x posterior draws x virtual patients -> per-patient table, summary, comparisons.

All arms simulate the same virtual patients (same seed and patient ids: a paired design), so
differences between arms are paired. Rates are in percent with 95% intervals that carry both the
finite virtual cohort (a Jeffreys interval per draw) and, with `draws > 1`, parameter uncertainty
from the posterior (draws pooled).

Modules: `arms` (experiment arms, prepared per draw), `table` (the patient table and its
endpoints), `statistics` (rates, paired differences, intervals) and `runner` (`run_trial`).
"""

from vpop.trial.arms import TrialSettings, arms_from_config, prepare_draws
from vpop.trial.runner import SAMPLE_PATIENTS, TrialResult, run_trial
from vpop.trial.statistics import EndpointCounts, compare, count_endpoints
from vpop.trial.table import MAIN_ENDPOINTS, patient_table

__all__ = ["MAIN_ENDPOINTS", "SAMPLE_PATIENTS", "EndpointCounts", "TrialResult", "TrialSettings", "arms_from_config",
           "compare", "count_endpoints", "patient_table", "prepare_draws", "run_trial"]
