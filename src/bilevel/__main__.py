"""``python -m bilevel JOB ...`` (and ``torchrun --nproc-per-node N -m bilevel JOB ...``)."""

import sys

from bilevel.cli import main

sys.exit(main())
