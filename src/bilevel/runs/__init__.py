"""Run infrastructure shared by every upper-level method and command-line job: the run
directory (configuration, metrics log, crash-safe checkpoints), RNG state capture, a progress
bar and plots of the logged metrics."""

from bilevel.runs.plots import load_records, new_figure, plot_metrics
from bilevel.runs.progress import Progress, format_duration
from bilevel.runs.rng import rng_state, set_rng_state
from bilevel.runs.rundir import (
    METRIC_KEYS,
    RunDirectory,
    Stopwatch,
    check_job_record,
    read_metrics,
    to_jsonable,
)

__all__ = [
    "METRIC_KEYS",
    "Progress",
    "RunDirectory",
    "Stopwatch",
    "check_job_record",
    "format_duration",
    "load_records",
    "new_figure",
    "plot_metrics",
    "read_metrics",
    "rng_state",
    "set_rng_state",
    "to_jsonable",
]
