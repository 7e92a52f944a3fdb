"""The ``bilevel`` command line: one subcommand per job.

Each job module provides ``add_arguments(parser)`` and ``run(args) -> int``; they are imported
only when their subcommand is used, so ``bilevel --help`` stays fast. A user mistake ends with
one line on stderr naming the problem (exit status 2); any other failure with one line too,
and its traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import traceback

from bilevel import distributed
from bilevel.problem import BilevelError

# subcommand -> (module, one-line help)
JOBS: dict[str, tuple[str, str]] = {
    "denoise": ("bilevel.imaging.job", "learn a regulariser for denoising (main job)"),
    "deblur": ("bilevel.imaging.job", "learn a regulariser for deblurring"),
    "inpaint": ("bilevel.imaging.job", "learn a regulariser for inpainting"),
    "hpo": ("bilevel.learning.job", "learn per-feature regularisation strengths (SID, AID, ...)"),
    "reconstruct": ("bilevel.imaging.apply", "apply a learned regulariser to your images"),
    "models": ("bilevel.imaging.pretrained_models", "list the shipped pretrained regularisers"),
}

DEBUG_HELP = "show the traceback of an error"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Bilevel learning with inexact and stochastic hypergradients.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            p.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
            )
            importlib.import_module(module).add_arguments(p, name)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    """Run ``bilevel ARGV`` and return the exit status: the job's (0: finished, 1: stopped
    early, 130: interrupted), 2 for a usage or input error (the message is on stderr), 0 after
    ``--help``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2); argparse printed it
        return done.code if isinstance(done.code, int) else 2
    module = importlib.import_module(JOBS[args.job][0])
    distributed.init_from_env()  # under torchrun: join the data-parallel process group
    prefix = f"bilevel {args.job}"
    args.argv = argv[argv.index(args.job) + 1 :] if args.job in argv else []
    try:
        return int(module.run(args) or 0)
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
