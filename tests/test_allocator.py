"""Tests for ``bilevel.allocator``: freed large blocks are reused instead of faulted in anew."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bilevel.allocator import is_glibc

glibc = sys.platform.startswith("linux") and is_glibc()

# allocations of 64 MB tensors, each freed before the next; minor page faults counted
_PROBE = """
import json, resource, sys
from bilevel.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] != "default" else False
if sys.argv[1] == "applied":
    print(json.dumps({"applied": applied}))
    sys.exit()
import torch
for _ in range(10):  # the heap settles: the first few blocks are faulted in either way
    torch.empty(8 * 2**20, dtype=torch.float64).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(8 * 2**20, dtype=torch.float64).fill_(1.0)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc, reason="glibc's malloc only")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _probe("default"), _probe("keep")
    assert not default["applied"] and kept["applied"]
    # 64 MB is 16 384 pages: by default every allocation faults all of them in again
    assert default["faults"] > 10 * 16_000
    assert kept["faults"] < 1_000


@pytest.mark.skipif(not glibc, reason="glibc's malloc only")
def test_the_user_keeps_the_allocator_with_an_opt_out_or_own_settings():
    assert _probe("applied")["applied"]
    assert not _probe("applied", BILEVEL_MALLOC="system")["applied"]
    assert not _probe("applied", MALLOC_MMAP_THRESHOLD_="1048576")["applied"]
