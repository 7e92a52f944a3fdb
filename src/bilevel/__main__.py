"""``python -m bilevel``: the command line (:mod:`bilevel.cli`)."""

import sys

from bilevel.cli import main

sys.exit(main())
