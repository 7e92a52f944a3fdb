"""MkDocs hook: ``{{ cli_help JOB }}`` in a page becomes the ``bilevel JOB --help`` text, so the
job pages list exactly the options of the installed command."""

from __future__ import annotations

import contextlib
import io
import re

from bilevel.cli import main

_MARK = re.compile(r"\{\{ cli_help (\w+) \}\}")


def _help(job: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([job, "--help"])
    if code != 0:
        raise RuntimeError(f"bilevel {job} --help exited with {code}")
    return "```text\n" + out.getvalue().replace("usage: bilevel", "bilevel", 1) + "```"


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return _MARK.sub(lambda m: _help(m.group(1)), markdown)
