"""A run directory: resolved configuration, metrics log, and crash-safe checkpoints.

Layout of a run directory::

    config.json          the resolved configuration (pretty JSON)
    metrics.jsonl        one JSON object per line, one line per logged record
    checkpoint.pt        the latest checkpoint (written atomically)
    checkpoint.prev.pt   the checkpoint before it (a fallback if the latest is unreadable)
    result.json          how the run loop ended ({"status": "running"} while it runs)
    .lock                the lock of the process writing the directory (its PID inside)

One writer at a time: :class:`RunLock` holds an exclusive ``fcntl.flock`` on ``.lock`` while a
process writes the directory; a second writer fails at once with a :class:`BilevelError`
naming the holder's PID. Every file except the append-only ``metrics.jsonl`` is written
atomically (:func:`atomic_output`: a temporary file in the directory, fsynced, renamed over
the target), so a crash leaves the old or the new file, never a partial one.

Resuming: a checkpoint stores how many metrics lines had been written when it was saved and
the step of the last one. Loading it repairs ``metrics.jsonl`` to those records (later ones,
an unfinished last line and unreadable lines are dropped; missing ones are reported), so that
the log of a run that was interrupted and resumed equals the log of an uninterrupted run
(given deterministic code and restored RNG states, see :mod:`bilevel.runs.rng`).

JSON values: tensors and numpy values become Python scalars (0-d) or nested lists. Files are
standard JSON (``allow_nan=False``): a non-finite number is written as ``null`` and, in a JSON
object written by :func:`dumps_json` (every file and metrics line of a run), the key
``"non_finite"`` maps its path to the reason, ``"nan"``, ``"inf"`` or ``"-inf"``;
:func:`read_metrics` turns ±inf back into floats (NaN stays None).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import re
import signal
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.config import read_text
from bilevel.problem import BilevelError

__all__ = [
    "CHECKPOINT_FORMAT",
    "METRIC_KEYS",
    "RunDirectory",
    "RunLock",
    "Stopwatch",
    "atomic_output",
    "dumps_json",
    "read_json",
    "read_metrics",
    "save_torch",
    "to_jsonable",
    "write_json",
    "write_text",
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
RESULT_NAME = "result.json"
LOCK_NAME = ".lock"
NON_FINITE_KEY = "non_finite"
_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- JSON


def _float(x: float, where: str, non_finite: dict[str, str] | None) -> float | None:
    if math.isfinite(x):
        return x
    if non_finite is not None:
        non_finite[where] = "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return None


def to_jsonable(
    value: Any, *, where: str = "value", non_finite: dict[str, str] | None = None
) -> Any:
    """``value`` as plain JSON data: dict (string keys), list, str, int, float, bool or None.

    Tensors and numpy arrays become scalars (one element, 0-d) or nested lists; tuples and sets
    become lists; paths become strings; enums their value; objects with ``to_config()`` (such
    as schedules) their configuration; dataclasses dictionaries. Non-finite numbers become None;
    when ``non_finite`` is a dict, it receives their paths (``where.key[i]``) and reasons
    ("nan", "inf", "-inf"). Anything else raises :class:`BilevelError` naming ``where``.
    """
    nf = non_finite
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(float(value), where, nf)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dim() == 0:
            return to_jsonable(value.item(), where=where, non_finite=nf)
        items = value.tolist()
        return [to_jsonable(v, where=f"{where}[{i}]", non_finite=nf) for i, v in enumerate(items)]
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return to_jsonable(value.item(), where=where, non_finite=nf)
        items = value.tolist()
        return [to_jsonable(v, where=f"{where}[{i}]", non_finite=nf) for i, v in enumerate(items)]
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), where=where, non_finite=nf)
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, where=where, non_finite=nf)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BilevelError(f"{where}: dictionary keys must be strings, got {k!r}")
            out[k] = to_jsonable(v, where=f"{where}.{k}", non_finite=nf)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_jsonable(v, where=f"{where}[{i}]", non_finite=nf) for i, v in enumerate(items)]
    to_config = getattr(value, "to_config", None)
    if callable(to_config):
        return to_jsonable(to_config(), where=where, non_finite=nf)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where=where, non_finite=nf)
    if isinstance(value, complex):
        raise BilevelError(f"{where}: complex numbers cannot be stored in JSON")
    raise BilevelError(f"{where}: cannot store a {type(value).__name__} in JSON ({value!r})")


def dumps_json(value: Any, *, indent: int | None = None, where: str = "value") -> str:
    """Standard JSON text of ``value`` (see :func:`to_jsonable`; ``allow_nan=False``).

    Non-finite numbers are written as null; when ``value`` is a dict, its key ``"non_finite"``
    then maps each such path (relative to the top level, e.g. ``test.learned.psnr``) to the
    reason, "nan", "inf" or "-inf".
    """
    non_finite: dict[str, str] = {}
    data = to_jsonable(value, where=where, non_finite=non_finite)
    if non_finite and isinstance(data, dict):
        data[NON_FINITE_KEY] = {k[len(where) :].lstrip("."): v for k, v in non_finite.items()}
    separators = (",", ":") if indent is None else None
    try:
        return json.dumps(
            data, indent=indent, allow_nan=False, ensure_ascii=False, separators=separators
        )
    except ValueError as exc:  # pragma: no cover - to_jsonable removes every non-finite value
        raise BilevelError(f"{where}: {exc}") from None


_PATH_TOKEN = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _restore_infinities(value: Any) -> Any:
    """Put back the ±inf that :func:`dumps_json` listed under ``"non_finite"`` (and the
    strings "inf" / "-inf" that older files hold); NaN stays None."""
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, list):
        return [_restore_infinities(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _restore_infinities(v) for k, v in value.items() if k != NON_FINITE_KEY}
    listed = value.get(NON_FINITE_KEY)
    if not isinstance(listed, dict):
        if NON_FINITE_KEY in value:
            out[NON_FINITE_KEY] = listed
        return out
    for path, reason in listed.items():
        if reason not in ("inf", "-inf") or not isinstance(path, str):
            continue
        tokens = [(m.group(1), m.group(2)) for m in _PATH_TOKEN.finditer("." + path)]
        target: Any = out
        for i, (key, index) in enumerate(tokens):
            last = i == len(tokens) - 1
            try:
                slot = key if key is not None else int(index)
                if last:
                    if target[slot] is None:
                        target[slot] = math.inf if reason == "inf" else -math.inf
                else:
                    target = target[slot]
            except (KeyError, IndexError, TypeError):
                break
    return out


def _dumps_line(record: Mapping[str, Any]) -> str:
    return dumps_json(record, where="record")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The JSON data of ``path``.

    Raises:
        BilevelError: the file is missing, unreadable or not valid JSON (naming ``what``).
    """
    p = Path(path)
    text = read_text(p, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BilevelError(f"{what} {p} is damaged (not valid JSON: {exc})") from None


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
    # in the target's directory, so that os.replace is an atomic rename on one file system;
    # the target's name comes last, so that its ending still tells writers the format
    return target.parent / f"{_TMP_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:12]}.{target.name}"


#: ``BILEVEL_FAULT=POINT:N[:TERM]`` kills the process with SIGKILL (or sends it SIGTERM) the
#: N-th time it reaches POINT (``write``: an atomic file written but not yet renamed;
#: ``checkpoint``: between the two renames of a checkpoint; ``log``: half of a metrics line
#: written; ``step``: a step committed). For fault-injection tests only: a crash or a
#: scheduler's stop at an exact moment.
FAULT_VARIABLE = "BILEVEL_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here (SIGKILL) if :data:`FAULT_VARIABLE` names this point and occurrence."""
    spec = os.environ.get(FAULT_VARIABLE)
    if not spec:
        return
    point, _, rest = spec.partition(":")
    if point != name:
        return
    count, _, how = rest.partition(":")
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if str(_fault_counts[name]) == count:
        os.kill(os.getpid(), signal.SIGTERM if how == "TERM" else signal.SIGKILL)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` atomically: yields a temporary path in the same directory; when the block
    ends without an exception, that file is fsynced and renamed over ``path`` (else removed).
    A crash at any moment leaves the old ``path`` or the new one, never a partial file."""
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point("write")
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_directory(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> None:
    """Write ``value`` as standard JSON (:func:`dumps_json`) to ``path`` atomically."""
    write_text(path, dumps_json(value, indent=indent, where=Path(path).name) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


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


# ----------------------------------------------------------------------------- lock

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

# resolved directory -> [lock file descriptor, holders in this process]
_held_locks: dict[Path, list[int]] = {}


class RunLock:
    """An exclusive lock on a run directory, for the writer of its files.

    ``with RunLock(path):`` creates ``path`` if needed and holds ``fcntl.flock`` on
    ``path/.lock`` (which records the holder's PID) until the block ends; the lock dies with
    the process, so a crash never leaves it behind. Re-entrant within one process. Raises
    :class:`BilevelError` at once when another process holds it, naming that process, and
    when ``path`` is a file or cannot be written.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._key: Path | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (see the class docstring)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise BilevelError(f"run directory {path} exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            key = path.resolve()
            if key in _held_locks:
                _held_locks[key][1] += 1
                self._key = key
                return
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BilevelError(
                f"cannot write to the run directory {path}: {exc.strerror or exc}; choose "
                "another directory"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise BilevelError(
                    f"run directory {path} is in use by another run (process {holder}); wait "
                    "for it to end, or choose another directory"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks[key] = [fd, 1]
        self._key = key

    def release(self) -> None:
        """Let go of the lock (the last holder in this process closes the lock file)."""
        key, self._key = self._key, None
        if key is None or key not in _held_locks:
            return
        entry = _held_locks[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held_locks[key]
            os.close(entry[0])  # closing the descriptor releases the flock


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
        self._lock = RunLock(self.path)
        self._lock.acquire()  # creates the directory; released by close()
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise
        self.resumed = False  # True once a checkpoint has been loaded

    def _open(self, overwrite: bool) -> None:
        for stale in self.path.glob(_TMP_PREFIX + "*"):
            _remove_quietly(stale)
        owned = [
            self.config_path,
            self.metrics_path,
            self.checkpoint_path,
            self.previous_checkpoint_path,
            self.path / RESULT_NAME,
        ]
        self._last_step: Any = None
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

    def close(self) -> None:
        """Release the directory's lock (see :class:`RunLock`)."""
        self._lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        if self.resume:
            check_resume(self.config_path, config, ignore=ignore)
        write_text(self.config_path, dumps_json(config, indent=2, where="config") + "\n")
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
        line = _dumps_line(record) + "\n"
        self._sync()
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            if os.environ.get(FAULT_VARIABLE, "").startswith("log:"):
                f.write(line[: len(line) // 2])
                f.flush()
                fault_point("log")
                f.write(line[len(line) // 2 :])
            else:
                f.write(line)
            f.flush()
        self._num_records += 1
        self._last_step = record.get("step", self._last_step)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records logged so far, oldest first."""
        self._sync()
        return read_metrics(self.metrics_path)

    def _repair_metrics(self, lines: int, last_step: Any) -> None:
        """Make ``metrics.jsonl`` hold the records written before the checkpoint: its first
        ``lines`` readable complete lines, none with a step after ``last_step``. Rewritten
        atomically when that changes it; a warning reports records that are missing."""
        path = self.metrics_path
        kept: list[bytes] = []
        unreadable = 0
        if path.exists():
            with open(path, "rb") as f:
                for raw in f:
                    if len(kept) == lines or not raw.endswith(b"\n"):
                        break
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        unreadable += 1
                        continue
                    step = record.get("step") if isinstance(record, dict) else None
                    if (
                        last_step is not None
                        and isinstance(step, (int, float))
                        and isinstance(last_step, (int, float))
                        and step > last_step
                    ):
                        break
                    kept.append(raw)
            if b"".join(kept) != path.read_bytes():
                write_text(path, b"".join(kept).decode("utf-8"))
        if len(kept) < lines or unreadable:
            warnings.warn(
                f"{path} held {len(kept)} readable records of the {lines} written before the "
                f"checkpoint ({unreadable} unreadable lines dropped); the run continues from the "
                "checkpoint and those records stay missing",
                RuntimeWarning,
                stacklevel=4,
            )
        self._num_records = len(kept)
        self._last_step = last_step

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
            "metrics_step": self._last_step,
            "saved_at": time.time(),
            "state": dict(state),
        }
        tmp = _temporary_path(self.checkpoint_path)
        try:
            with open(tmp, "xb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            fault_point("write")
            if keep_previous and self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)
                fault_point("checkpoint")
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
        last_step = None if payload is None else payload.get("metrics_step")
        if self.resume and not self._synced:
            self._repair_metrics(lines, last_step)
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


def check_resume(
    path: str | os.PathLike, config: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> None:
    """The one resume check: refuse to continue a run whose stored configuration ``path``
    (``config.json`` of the run loop, ``job.json`` of a job) differs from ``config``, compared
    as JSON stores them, except for the keys in ``ignore`` (dotted paths such as
    ``"budget"`` or ``"upper.budget"``: what may change on resume). No stored file, no check.

    Raises:
        BilevelError: a damaged file, or naming every entry that differs, old -> new.
    """
    p = Path(path)
    if not p.is_file():
        return
    old = read_json(p, "the run's stored configuration")
    if not isinstance(old, dict):
        raise BilevelError(f"{p} is damaged (not a JSON object); start a new run")
    new = json.loads(dumps_json(config))
    old.pop(NON_FINITE_KEY, None)
    new.pop(NON_FINITE_KEY, None)
    for key in ignore:
        _drop(old, key)
        _drop(new, key)
    diffs = _differences(old, new)
    if diffs:
        shown = "; ".join(diffs[:10]) + ("; ..." if len(diffs) > 10 else "")
        raise BilevelError(
            f"cannot resume {p.parent}: the configuration differs from the stored one "
            f"({shown}). Use the same settings, or start a new run."
        )
