"""Scaling-law fitting: forms, records, the vmapped L-BFGS fitter, `llmlab fit`.

Records are a dict of numpy columns (see records.py); fits run in float64 inside
a scoped `jax.enable_x64`, leaving the process in its previous precision mode.
"""

from llmlab.scaling.fit import (BootstrapResult, FitResult, are, bootstrap, fit_law,
                                naive_are, predict, saturation)
from llmlab.scaling.fitting import run_fit
from llmlab.scaling.forms import FORMS, compute_optimal, register_form
from llmlab.scaling.records import RecordsError, as_records, read_records, select
