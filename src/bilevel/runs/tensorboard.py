"""TensorBoard logging of a run (optional: needs ``pip install 'bilevel[tensorboard]'``).

:class:`TensorBoardLog` writes event files into ``<run directory>/tensorboard``:

* every numeric metric of ``metrics.jsonl`` as a scalar ``metrics/<name>`` at its step, read
  from the run directory's log by :meth:`TensorBoardLog.sync` (so the run loop needs no hook,
  and a resumed run continues where the events stopped);
* images (reconstructions, learned filters) at the step of each evaluation, :meth:`images`;
* single scalars, e.g. the final evaluation, :meth:`scalars`.

View them with ``tensorboard --logdir <run directory>/tensorboard``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from bilevel.runs.rundir import read_metrics

__all__ = ["TENSORBOARD_DIR", "TensorBoardLog", "tensorboard_available"]

#: Sub-folder of the run directory that holds the event files.
TENSORBOARD_DIR = "tensorboard"
#: File in that folder holding the last step forwarded from ``metrics.jsonl``.
SYNCED_FILE = "synced_step"


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardLog:
    """Event files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        if not tensorboard_available():
            raise ImportError(
                "TensorBoard logging needs the tensorboard package, which is not installed; "
                "install it with pip install 'bilevel[tensorboard]'"
            )
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        marker = self.log_dir / SYNCED_FILE
        self._synced_step = int(marker.read_text()) if marker.is_file() else -1

    def sync(self) -> int:
        """Log the records of ``metrics.jsonl`` after the last synced step; returns how many.

        The last synced step is kept in ``tensorboard/synced_step``, so that a resumed run
        does not log its earlier steps twice."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        count = 0
        for record in read_metrics(path):
            step = record.get("step")
            if not isinstance(step, int) or step <= self._synced_step:
                continue
            self.scalars(record, step, prefix="metrics")
            self._synced_step = step
            count += 1
        self.writer.flush()
        if count:
            (self.log_dir / SYNCED_FILE).write_text(f"{self._synced_step}\n", encoding="utf-8")
        return count

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "metrics") -> None:
        """One scalar ``<prefix>/<name>`` per finite number in ``values`` (counters skipped)."""
        for name, value in values.items():
            if name in ("step",) or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)

    def images(self, tag: str, images: Tensor, step: int) -> None:
        """A batch of images (N, C, H, W) with values in [0, 1] (clipped; C = 1 or 3)."""
        self.writer.add_images(
            tag, images.detach().clamp(0, 1).float().cpu(), global_step=step, dataformats="NCHW"
        )

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.flush()
        self.writer.close()
