"""Run infrastructure shared by every upper-level method and command-line job: the run
directory (configuration, metrics log, crash-safe checkpoints), RNG state capture, a progress
bar and plots of the logged metrics."""

from bilevel.runs.plots import load_records, new_figure, plot_metrics
from bilevel.runs.progress import Progress, format_duration
from bilevel.runs.rng import rng_state, set_rng_state
from bilevel.runs.rundir import (
    METRIC_KEYS,
    RunDirectory,
    RunLock,
    Stopwatch,
    atomic_output,
    check_job_record,
    dumps_json,
    read_json,
    read_metrics,
    save_torch,
    to_jsonable,
    write_json,
    write_text,
)

__all__ = [
    "METRIC_KEYS",
    "Progress",
    "RunDirectory",
    "RunLock",
    "Stopwatch",
    "atomic_output",
    "check_job_record",
    "dumps_json",
    "format_duration",
    "load_records",
    "new_figure",
    "plot_metrics",
    "read_json",
    "read_metrics",
    "rng_state",
    "save_torch",
    "set_rng_state",
    "to_jsonable",
    "write_json",
    "write_text",
]
