"""The ``bilevel`` command line: one subcommand per job.

Each job is described by a configuration dataclass (:mod:`bilevel.config`): its fields are the
job's options (with help text and default), ``--config FILE`` reads them from TOML (options
given on the command line override the file), and ``--print-config`` prints the effective
configuration as TOML and exits. The command line then hands the configuration to the job's
library function. Only the configuration modules, which import no torch, are loaded to build
the parser, so ``bilevel --help`` and ``bilevel JOB --help`` stay fast. A user mistake ends
with one line on stderr naming the problem (exit status 2); any other failure with one line
too, and its traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import traceback
from typing import Any

from bilevel import __version__
from bilevel.config import (
    base_type,
    config_fields,
    config_from_dict,
    load_config,
    resume_command,
    to_toml,
)
from bilevel.errors import BilevelError

__all__ = [
    "JOBS",
    "add_config_arguments",
    "build_parser",
    "config_from_args",
    "main",
    "resume_command",
]

# subcommand -> (configuration class, job function, one-line help); "module:name"
JOBS: dict[str, tuple[str | None, str, str]] = {
    "denoise": (
        "bilevel.imaging.config:DenoiseConfig",
        "bilevel.imaging.job:run",
        "learn a regulariser for denoising (main job)",
    ),
    "deblur": (
        "bilevel.imaging.config:DeblurConfig",
        "bilevel.imaging.job:run",
        "learn a regulariser for deblurring",
    ),
    "inpaint": (
        "bilevel.imaging.config:InpaintConfig",
        "bilevel.imaging.job:run",
        "learn a regulariser for inpainting",
    ),
    "hpo": (
        "bilevel.learning.config:HpoConfig",
        "bilevel.learning.job:run",
        "learn per-feature regularisation strengths (SID, AID, ...)",
    ),
    "reconstruct": (
        "bilevel.imaging.config:ReconstructConfig",
        "bilevel.imaging.apply:run",
        "apply a learned regulariser to your images",
    ),
    "models": (None, "bilevel.imaging.pretrained_models:print_models", "list the shipped models"),
}
#: Jobs that write a run directory (and take --resume / --overwrite).
TRAINING_JOBS = ("denoise", "deblur", "inpaint", "hpo")

DEBUG_HELP = "show the traceback of an error (default: off)"


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the configuration class ``cls`` (booleans as ``--x`` /
    ``--no-x``), each with its help text and default. Options not given are left out of the
    parsed namespace, so that :func:`config_from_args` can tell them from defaults."""
    for f, tp in config_fields(cls):
        meta = f.metadata
        missing = f.default_factory is dataclasses.MISSING
        default = f.default if missing else f.default_factory()
        shown = meta.get("default_text") or _shown(default)
        help_text = f"{meta['help']} (default: {shown})".replace("%", "%%")
        base = base_type(tp)[0]
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            kwargs["nargs"] = "*" if base is list else "?"
            parser.add_argument(f.name, **kwargs)
            continue
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
        parser.add_argument(_flag(f.name), **kwargs)


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return "none" if not default else " ".join(map(str, default))
    return str(default)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The configuration ``cls`` of parsed options: the defaults, then the file of
    ``--config`` (if any), then the options given on the command line."""
    given = {f.name: getattr(args, f.name) for f, _ in config_fields(cls) if hasattr(args, f.name)}
    path = getattr(args, "config", None)
    if path is not None:
        return load_config(cls, path, given)
    return config_from_dict(cls, {}, "options", given)


def _add_job_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    config_spec = JOBS[name][0]
    if config_spec is None:  # bilevel models
        parser.add_argument(
            "--json", action="store_true", help="print the records as JSON (default: off)"
        )
        return
    cls = _load(config_spec)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    examples = getattr(cls, "EXAMPLES", None) or (
        f"bilevel {name} --print-config > run.toml",
        f"bilevel {name} --config run.toml --budget 20000",
    )
    parser.epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    job = parser.add_argument_group("invocation")
    job.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="read the options from this TOML file (options given here override it; default: none)",
    )
    job.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML and exit",
    )
    if name in TRAINING_JOBS:
        job.add_argument(
            "--resume", action="store_true", help="continue the run in --run-dir (default: off)"
        )
        job.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a run already in --run-dir (default: off)",
        )
    job.add_argument(
        "--json",
        action="store_true",
        help="print the results as one JSON object on stdout (default: off)",
    )
    add_config_arguments(parser.add_argument_group("job options"), cls)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of ``bilevel``; only the subcommand named in ``argv`` gets its options."""
    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Bilevel learning with inexact and stochastic hypergradients.",
    )
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, _, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            p.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
            )
            _add_job_arguments(p, name)
    return parser


def _run_job(args: argparse.Namespace) -> int:
    """Build the configuration of ``args`` and hand it to the job's function."""
    config_spec, job_spec, _ = JOBS[args.job]
    if config_spec is None:
        return int(_load(job_spec)(as_json=args.json) or 0)
    config = config_from_args(_load(config_spec), args)
    if args.print_config:
        print(to_toml(config), end="")
        return 0
    job = _load(job_spec)
    from bilevel import distributed  # torch: only once a job runs
    from bilevel.allocator import keep_freed_memory

    keep_freed_memory()  # large per-iteration tensors are reused, not faulted in anew

    distributed.init_from_env()  # under torchrun: join the data-parallel process group
    if args.job not in TRAINING_JOBS:
        return int(job(config, json=args.json) or 0)

    def started(run_dir: Any) -> None:  # from here on, an interrupted run can be resumed
        args.run_dir = str(run_dir)
        args.started = True

    return int(
        job(
            config,
            resume=args.resume,
            overwrite=args.overwrite,
            json=args.json,
            argv=args.argv,
            on_start=started,
        )
        or 0
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``bilevel ARGV`` and return the exit status: the job's (0: finished, 1: stopped
    early, 130: interrupted), 2 for a usage or input error (the message is on stderr), 0 after
    ``--help`` or ``--version``.

    A process of a data-parallel run (``torchrun``) ends here, with that status, once every
    process has finished (see :func:`bilevel.distributed.leave`)."""
    status = _main(argv)
    distributed = sys.modules.get("bilevel.distributed")  # imported only once a job ran
    if distributed is not None:
        distributed.leave(status)
    return status


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2); argparse printed it
        return done.code if isinstance(done.code, int) else 2
    prefix = f"bilevel {args.job}"
    args.argv = argv[argv.index(args.job) + 1 :] if args.job in argv else []
    try:
        return _run_job(args)
    except KeyboardInterrupt:
        run_dir = getattr(args, "run_dir", None)
        hint = (
            f"; resume with: {resume_command(args.job, args.argv, run_dir)}"
            if getattr(args, "started", False)
            else ""
        )
        print(f"{prefix}: interrupted{hint}", file=sys.stderr)
        return 130
    except BilevelError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder that cannot be read or written
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        print(f"{prefix}: error: out of memory; try smaller sizes or batches", file=sys.stderr)
        return 1
    except Exception as err:  # anything else: one line, the traceback only with --debug
        if args.debug:
            traceback.print_exc()
        text = str(err).strip().splitlines()
        detail = f": {text[0]}" if text else ""
        print(
            f"{prefix}: error: {type(err).__name__}{detail} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
