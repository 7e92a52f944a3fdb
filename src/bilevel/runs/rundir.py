"""A run directory: resolved configuration, metrics log, and crash-safe checkpoints.

Layout of a run directory::

    config.json          the resolved configuration (pretty JSON)
    metrics.jsonl        one JSON object per line, one line per logged record
    checkpoint.pt        the latest checkpoint (written atomically)
    checkpoint.prev.pt   the checkpoint before it (a fallback if the latest is unreadable)

Resuming: a checkpoint stores how many metrics lines had been written when it was saved.
Loading it truncates ``metrics.jsonl`` to that many lines, so that the log of a run that was
interrupted and resumed equals the log of an uninterrupted run (given deterministic code and
restored RNG states, see :mod:`bilevel.runs.rng`).

JSON values: tensors and numpy values become Python scalars (0-d) or nested lists; NaN becomes
``null``; +inf and -inf become the strings ``"inf"`` and ``"-inf"``, which
:meth:`RunDirectory.read_metrics` turns back into floats.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.problem import BilevelError

__all__ = [
    "CHECKPOINT_FORMAT",
    "METRIC_KEYS",
    "RunDirectory",
    "Stopwatch",
    "read_metrics",
    "to_jsonable",
]

#: Keys that upper-level methods log in every record (others, e.g. ``test_psnr``, may follow):
#: step (upper-level iteration), epoch, upper_loss, eps (lower tolerance ε_k), delta (adjoint
#: tolerance δ_k), alpha (step size α_k), bound (hypergradient error bound ω), cost (cumulative
#: oracle calls), wall_time (seconds since the start of the run, excluding time spent stopped).
METRIC_KEYS = (
    "step",
    "epoch",
    "upper_loss",
    "eps",
    "delta",
    "alpha",
    "bound",
    "cost",
    "wall_time",
)

CHECKPOINT_FORMAT = 1

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pt"
_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- JSON


def _float(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def to_jsonable(value: Any, *, where: str = "value") -> Any:
    """``value`` as plain JSON data: dict (string keys), list, str, int, float, bool or None.

    Tensors and numpy arrays become scalars (one element, 0-d) or nested lists; tuples and sets
    become lists; paths become strings; enums their value; objects with ``to_config()`` (such
    as schedules) their configuration; dataclasses dictionaries. NaN becomes None and ±inf the
    strings "inf" / "-inf". Anything else raises :class:`BilevelError` naming ``where``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(float(value))
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dim() == 0:
            return to_jsonable(value.item(), where=where)
        return [to_jsonable(v, where=where) for v in value.tolist()]
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return to_jsonable(value.item(), where=where)
        return [to_jsonable(v, where=where) for v in value.tolist()]
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where=where)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, where=where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BilevelError(f"{where}: dictionary keys must be strings, got {k!r}")
            out[k] = to_jsonable(v, where=f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(items)]
    to_config = getattr(value, "to_config", None)
    if callable(to_config):
        return to_jsonable(to_config(), where=where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where=where)
    if isinstance(value, complex):
        raise BilevelError(f"{where}: complex numbers cannot be stored in JSON")
    raise BilevelError(f"{where}: cannot store a {type(value).__name__} in JSON ({value!r})")


def _restore_infinities(value: Any) -> Any:
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, list):
        return [_restore_infinities(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore_infinities(v) for k, v in value.items()}
    return value


def _dumps_line(record: Mapping[str, Any]) -> str:
    data = to_jsonable(record, where="record")
    return json.dumps(data, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file (or of the ``metrics.jsonl`` inside a run directory).

    A last line without its newline (a write cut short by a crash) is ignored.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_NAME
    if not p.exists():
        return []
    records = []
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                break
            if not line.strip():
                continue
            try:
                records.append(_restore_infinities(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise BilevelError(f"{p}:{number}: not a JSON line ({exc})") from None
    return records


# ----------------------------------------------------------------------------- helpers


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary_path(target: Path) -> Path:
    # in the target's directory, so that os.replace is an atomic rename on one file system
    return target.parent / f"{_TMP_PREFIX}{target.name}.{os.getpid()}.{uuid.uuid4().hex}"


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = _temporary_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(path.parent)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _drop(config: Any, dotted: str) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(config, dict) or key not in config:
            return
        config = config[key]
    if isinstance(config, dict):
        config.pop(keys[-1], None)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in old:
                out.append(f"{name} (new)")
            elif key not in new:
                out.append(f"{name} (missing)")
            else:
                out.extend(_differences(old[key], new[key], name))
        return out
    same_kind = isinstance(old, bool) == isinstance(new, bool)  # True == 1, but not here
    if old != new or not same_kind:
        return [f"{prefix or '<root>'}: {old!r} -> {new!r}"]
    return []


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


# ----------------------------------------------------------------------------- run directory


class RunDirectory:
    """The directory of one run: ``config.json``, ``metrics.jsonl`` and checkpoints.

    ``resume=False`` starts a new run: the directory is created, and if it already holds a run
    (any of the files above) a :class:`BilevelError` is raised unless ``overwrite=True``, which
    deletes those files (and nothing else). ``resume=True`` continues the run found there, if
    any: call :meth:`load_checkpoint` to get the saved state; that also truncates the metrics
    log to the lines written when the checkpoint was saved (to none if there is no checkpoint).
    """

    def __init__(
        self, path: str | os.PathLike, resume: bool = False, *, overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self.resume = bool(resume)
        if self.path.exists() and not self.path.is_dir():
            raise BilevelError(f"run directory {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(_TMP_PREFIX + "*"):
            _remove_quietly(stale)
        owned = [
            self.config_path,
            self.metrics_path,
            self.checkpoint_path,
            self.previous_checkpoint_path,
        ]
        if not self.resume:
            present = [p for p in owned if p.exists()]
            if present and not overwrite:
                raise BilevelError(
                    f"{self.path} already holds a run ({', '.join(p.name for p in present)}); "
                    "resume it (resume=True, --resume) or start again (overwrite=True, "
                    "--overwrite), or choose another directory"
                )
            for p in present:
                p.unlink()
            self._num_records = 0
            self._synced = True
        else:
            self._num_records = _count_lines(self.metrics_path)
            self._synced = False
        self.resumed = False  # True once a checkpoint has been loaded

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r}, resume={self.resume})"

    # paths

    @property
    def config_path(self) -> Path:
        """``config.json``: the resolved configuration."""
        return self.path / CONFIG_NAME

    @property
    def metrics_path(self) -> Path:
        """``metrics.jsonl``: one JSON record per line."""
        return self.path / METRICS_NAME

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.pt``: the latest checkpoint."""
        return self.path / CHECKPOINT_NAME

    @property
    def previous_checkpoint_path(self) -> Path:
        """``checkpoint.prev.pt``: the checkpoint saved before the latest one."""
        return self.path / PREVIOUS_CHECKPOINT_NAME

    @property
    def num_records(self) -> int:
        """Number of metrics records in the log (after resume truncation, once synced)."""
        self._sync()
        return self._num_records

    # configuration

    def write_config(
        self, config: Mapping[str, Any], *, ignore: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Write the resolved configuration to ``config.json`` and return it as plain JSON data.

        When resuming and a configuration is already stored, it must equal the new one except
        for the keys in ``ignore`` (dotted paths such as ``"budget"`` or ``"upper.budget"``);
        otherwise :class:`BilevelError` lists the differences. The stored file is then replaced
        by the new configuration.
        """
        if not isinstance(config, Mapping):
            raise BilevelError(f"config must be a dict, got {type(config).__name__}")
        data = to_jsonable(config, where="config")
        if self.resume and self.config_path.exists():
            old = self.read_config()
            a, b = json.loads(json.dumps(old)), json.loads(json.dumps(data))
            for key in ignore:
                _drop(a, key)
                _drop(b, key)
            diffs = _differences(a, b)
            if diffs:
                shown = "; ".join(diffs[:10]) + ("; ..." if len(diffs) > 10 else "")
                raise BilevelError(
                    f"cannot resume {self.path}: the configuration differs from the stored "
                    f"one ({shown}). Use the same settings, or start a new run."
                )
        text = json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        _write_atomic_text(self.config_path, text)
        return data

    def read_config(self) -> dict[str, Any] | None:
        """The stored configuration, or None if there is none."""
        if not self.config_path.exists():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BilevelError(f"{self.config_path} is not valid JSON: {exc}") from None

    # metrics

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (a dict with string keys) as a JSON line and flush it."""
        if not isinstance(record, Mapping):
            raise BilevelError(f"a metrics record must be a dict, got {type(record).__name__}")
        line = _dumps_line(record)
        self._sync()
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        self._num_records += 1

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records logged so far, oldest first."""
        self._sync()
        return read_metrics(self.metrics_path)

    def _truncate_metrics(self, lines: int) -> None:
        path = self.metrics_path
        if not path.exists():
            if lines:
                raise BilevelError(
                    f"{path} is missing, but the checkpoint expects {lines} metrics lines"
                )
            self._num_records = 0
            return
        offset = 0
        count = 0
        with open(path, "rb") as f:
            for line in f:
                if count == lines or not line.endswith(b"\n"):
                    break
                offset += len(line)
                count += 1
        if count < lines:
            raise BilevelError(
                f"{path} holds {count} complete lines, but the checkpoint expects {lines}: "
                "the metrics log is damaged; start a new run"
            )
        with open(path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        self._num_records = lines

    def _sync(self) -> None:
        # A resumed run must not append to records written after its checkpoint.
        if not self._synced:
            self._load(map_location="cpu", weights_only=True, quiet=True)

    # checkpoints

    def save_checkpoint(self, state: Mapping[str, Any], *, keep_previous: bool = True) -> Path:
        """Save ``state`` (tensors, state_dicts, RNG states, counters...) to ``checkpoint.pt``.

        The metrics log is flushed to disk first, and the number of records in it is stored
        with the state. The file is written to a temporary file in the run directory, fsynced
        and renamed over ``checkpoint.pt``, so a crash leaves either the old or the new
        checkpoint, never a partial one. With ``keep_previous`` the old one is kept as
        ``checkpoint.prev.pt``. Returns the path written.
        """
        if not isinstance(state, Mapping):
            raise BilevelError(f"checkpoint state must be a dict, got {type(state).__name__}")
        self._sync()
        if self.metrics_path.exists():
            with open(self.metrics_path, "rb+") as f:
                os.fsync(f.fileno())
        payload = {
            "format": CHECKPOINT_FORMAT,
            "metrics_lines": self._num_records,
            "saved_at": time.time(),
            "state": dict(state),
        }
        tmp = _temporary_path(self.checkpoint_path)
        try:
            with open(tmp, "xb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_directory(self.path)
        return self.checkpoint_path

    def load_checkpoint(
        self, *, map_location: Any = "cpu", weights_only: bool = True
    ) -> dict[str, Any] | None:
        """The state saved by the latest readable checkpoint, or None if there is none.

        Falls back to ``checkpoint.prev.pt`` (with a warning) if ``checkpoint.pt`` is missing or
        unreadable. Truncates the metrics log to the records written when that checkpoint was
        saved (all of them are dropped when there is no checkpoint). ``weights_only=True``
        restricts unpickling to tensors and plain containers, which covers optimizer state
        dicts and :func:`~bilevel.runs.rng.rng_state`; pass False for other objects, and only
        for files you trust.
        """
        return self._load(map_location=map_location, weights_only=weights_only, quiet=False)

    def _load(self, *, map_location: Any, weights_only: bool, quiet: bool) -> dict | None:
        payload = None
        errors = []
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if not path.exists():
                continue
            try:
                payload = torch.load(path, map_location=map_location, weights_only=weights_only)
            except Exception as exc:
                errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
                continue
            if not (isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT):
                errors.append(f"{path.name}: not a bilevel checkpoint")
                payload = None
                continue
            if path != self.checkpoint_path and not quiet:
                warnings.warn(
                    f"{self.checkpoint_path.name} is missing or unreadable; resuming from "
                    f"{path.name}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            break
        if payload is None and errors:
            raise BilevelError(f"no readable checkpoint in {self.path}: " + "; ".join(errors))
        lines = 0 if payload is None else int(payload["metrics_lines"])
        if self.resume and not self._synced:
            self._truncate_metrics(lines)
        self._synced = True
        if payload is None:
            return None
        if not quiet:
            self.resumed = True
        return payload["state"]


# ----------------------------------------------------------------------------- timing


class Stopwatch:
    """Wall-clock seconds spent in a run, continuing across resumes.

    ``elapsed()`` = ``offset`` + seconds since construction. Store ``elapsed()`` in the
    checkpoint and pass it back as ``offset`` when resuming, so that ``wall_time`` continues
    instead of restarting at 0 (the time the run was stopped is not counted).
    """

    def __init__(self, offset: float = 0.0) -> None:
        offset = float(offset)
        if not (math.isfinite(offset) and offset >= 0):
            raise BilevelError(f"Stopwatch offset must be finite and >= 0, got {offset!r}")
        self.offset = offset
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds: offset plus the time since this stopwatch was created."""
        return self.offset + (time.perf_counter() - self._start)

    def state_dict(self) -> dict[str, float]:
        """``{"elapsed": seconds}``, for a checkpoint."""
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.offset = float(state["elapsed"])
        self._start = time.perf_counter()


def check_job_record(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Refuse to resume the run in ``run_dir`` with options other than those stored in its
    ``job.json`` (compared as JSON stores them); no stored record, no check.

    Raises:
        BilevelError: naming every option that differs, old → new.
    """
    path = Path(run_dir) / "job.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    new = json.loads(json.dumps(record))
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
    if diffs:
        raise BilevelError(
            f"cannot resume {run_dir}: the options differ from the stored run "
            f"({'; '.join(diffs)}). Use the same options, or start a new run."
        )
