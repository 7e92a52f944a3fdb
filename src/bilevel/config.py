"""Typed job configurations: dataclasses read from and written to TOML.

Each job (``bilevel denoise | deblur | inpaint | hpo | reconstruct``) is described by one
dataclass whose fields are declared with :func:`option` (default, help text, allowed choices).
The same class defines the job's command-line options, its ``--config FILE`` (TOML),
its ``--print-config`` output and the ``job.json`` stored in its run directory. This module
imports neither torch nor argparse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bilevel.errors import BilevelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Invocation",
    "base_type",
    "config_dict",
    "config_fields",
    "config_from_dict",
    "job_record",
    "load_config",
    "option",
    "read_text",
    "resumable_fields",
    "resume_command",
    "to_toml",
    "write_toml",
]

C = TypeVar("C")

#: Scalar types a configuration field may have (or ``T | None``, or ``list[str]``).
_SCALARS = (bool, int, float, str)


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    positional: bool = False,
    resumable: bool = False,
) -> Any:
    """A configuration field: its ``default``, ``help`` text (without the default, which the
    command line appends: ``default_text`` when the default needs words, e.g. "12√N"), the
    allowed ``choices``, a ``metavar``, whether it is a ``positional`` argument, and whether
    it may change when a run is resumed (``resumable``: budgets, output switches)."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "default_text": default_text,
        "positional": positional,
        "resumable": resumable,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of each field of the configuration class ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type or ``list``, whether None is allowed) of a field type such as
    ``int | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return base_type(rest[0])[0], True
    if typing.get_origin(tp) is list:
        return list, False
    return tp, False


def _coerce(value: Any, tp: Any, name: str, where: str) -> Any:
    """``value`` checked against the field type ``tp`` (an int is accepted for a float, and a
    number for a text field such as a step schedule ``0.05`` or a column index ``-1``)."""
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return None
        raise BilevelError(f"{where}: {name} cannot be empty")
    if base is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise BilevelError(f"{where}: {name} must be a list of strings, got {value!r}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value)  # a number where text is expected: a step of 0.05, a column -1
    if base is bool and not isinstance(value, bool):
        raise BilevelError(f"{where}: {name} must be true or false, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BilevelError(f"{where}: {name} must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise BilevelError(f"{where}: {name} must be a {base.__name__}, got {value!r}")
    return value


def config_from_dict(
    cls: type[C],
    values: Mapping[str, Any],
    where: str = "configuration",
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """The configuration ``cls`` with ``values`` and then ``overrides`` (field
    defaults elsewhere). Unknown keys, wrong types and values outside a field's choices are a
    :class:`~bilevel.errors.BilevelError` naming the key and ``where`` it came from."""
    fields = {f.name: (f, tp) for f, tp in config_fields(cls)}
    chosen: dict[str, Any] = {}
    for source, items in ((where, values), ("options", overrides or {})):
        for key, value in items.items():
            if key not in fields:
                raise BilevelError(
                    f"{source}: unknown key {key!r} for {_job_name(cls)} (known: "
                    f"{', '.join(fields)})"
                )
            f, tp = fields[key]
            value = _coerce(value, tp, key, source)
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise BilevelError(
                    f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}"
                )
            chosen[key] = value
    return cls(**chosen)


def _job_name(cls: type) -> str:
    job = getattr(cls, "JOB", None)
    return f"bilevel {job}" if job else cls.__name__


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``.

    Raises:
        BilevelError: the file is missing or unreadable (naming ``what``).
    """
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BilevelError(f"{what} {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BilevelError(f"cannot read {what} {p}: {exc}") from None


def load_config(cls: type[C], path: str | Path, overrides: Mapping[str, Any] | None = None) -> C:
    """The configuration ``cls`` read from the TOML file ``path``, then ``overrides``.

    Raises:
        BilevelError: a missing or unreadable file, invalid TOML, or a bad key or value
            (one line naming it).
    """
    p = Path(path)
    text = read_text(p, "configuration file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BilevelError(f"{p} is not valid TOML: {exc}") from None
    table = next((v for v in data.values() if isinstance(v, dict)), None)
    if table is not None:
        key = next(k for k, v in data.items() if isinstance(v, dict))
        raise BilevelError(f"{p}: unknown table [{key}] (a configuration has no tables)")
    return config_from_dict(cls, data, str(p), overrides)


def config_dict(config: Any) -> dict[str, Any]:
    """The fields of a configuration as a plain dict (``job.json``, summaries)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


@dataclasses.dataclass
class Invocation:
    """How a job is run, beside what its configuration says it computes: continue
    (``resume``) or replace (``overwrite``) the run in the run directory, print the summary
    as JSON, and the command-line arguments (``argv``) that the resume hint repeats."""

    resume: bool = False
    overwrite: bool = False
    json: bool = False
    argv: list[str] | None = None


def resumable_fields(config: Any) -> tuple[str, ...]:
    """The fields of a configuration that may change when its run is resumed (budgets,
    outputs: those declared ``resumable``)."""
    return tuple(f.name for f in dataclasses.fields(config) if f.metadata.get("resumable"))


def job_record(config: Any) -> dict[str, Any]:
    """A run directory's ``job.json``: ``{"job": NAME, **fields}`` of the job's effective
    configuration."""
    return {"job": type(config).JOB, **config_dict(config)}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise BilevelError(f"cannot write {value!r} to TOML")


def to_toml(config: Any) -> str:
    """The TOML text of a configuration: one ``key = value`` line per field, each after a
    comment with its help text; a field that is unset (None) is a comment, so that reading
    the text back gives the same configuration."""
    lines = [f"# {_job_name(type(config))} configuration"]
    for f, _ in config_fields(type(config)):
        value = getattr(config, f.name)
        lines.append(f"# {f.metadata.get('help', '')}".rstrip())
        if value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_toml(config: Any, path: str | Path) -> None:
    """Write :func:`to_toml` of ``config`` to ``path``."""
    Path(path).write_text(to_toml(config), encoding="utf-8")


def resume_command(job: str, argv: list[str], run_dir: str | None) -> str:
    """The command that resumes an interrupted ``bilevel JOB ARGV`` run in ``run_dir``: the
    same options, with ``--run-dir RUN_DIR`` and ``--resume`` (and without ``--overwrite``)."""
    args = [job] + [a for a in argv if a not in ("--overwrite", "--debug")]
    if (
        run_dir is not None
        and "--run-dir" not in args
        and not any(a.startswith("--run-dir=") for a in args)
    ):
        args += ["--run-dir", run_dir]
    if "--resume" not in args:
        args.append("--resume")
    return "bilevel " + " ".join(shlex.quote(a) for a in args)
