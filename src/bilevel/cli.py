"""The ``bilevel`` command line: one subcommand per job.

Each job module provides ``add_arguments(parser)`` and ``run(args) -> int``; they are imported
only when their subcommand is used, so ``bilevel --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Bilevel learning with inexact and stochastic hypergradients.",
    )
    sub = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``bilevel ARGV`` and return the exit status: the job's (0: finished), 2 for a usage
    or input error (the message is on stderr), 0 after ``--help``."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2); argparse printed it
        return done.code if isinstance(done.code, int) else 2
    module = importlib.import_module(JOBS[args.job][0])
    try:
        return int(module.run(args) or 0)
    except BilevelError as err:
        print(f"bilevel {args.job}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bilevel {args.job}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
