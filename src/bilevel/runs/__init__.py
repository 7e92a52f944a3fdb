"""Run infrastructure shared by every upper-level method and command-line job: the run
directory (configuration, metrics log, crash-safe checkpoints), RNG state capture, a progress
bar and plots of the logged metrics."""

from bilevel.runs.plots import (
    figure_png,
    image_grid,
    load_records,
    new_figure,
    plot_metrics,
    running_mean,
)
from bilevel.runs.progress import Progress, format_duration
from bilevel.runs.report import Report
from bilevel.runs.rng import rng_state, set_rng_state
from bilevel.runs.rundir import (
    METRIC_KEYS,
    RunDirectory,
    RunLock,
    Stopwatch,
    atomic_output,
    check_resume,
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
    "Report",
    "RunDirectory",
    "RunLock",
    "Stopwatch",
    "atomic_output",
    "check_resume",
    "dumps_json",
    "figure_png",
    "format_duration",
    "image_grid",
    "load_records",
    "new_figure",
    "plot_metrics",
    "read_json",
    "read_metrics",
    "rng_state",
    "running_mean",
    "save_torch",
    "set_rng_state",
    "to_jsonable",
    "write_json",
    "write_text",
]
