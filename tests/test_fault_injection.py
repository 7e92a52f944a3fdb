"""Runs that cannot be lost or corrupted: `bilevel denoise` and `bilevel hpo` killed with
SIGKILL at random moments (before the first checkpoint, inside atomic writes and checkpoint
renames, in the middle of a metrics line, at random times) and stopped by SIGTERM, then
resumed, end at a θ bit-identical to that of an uninterrupted run, with every file of the run
directory intact.

The runs are processes forked from one driver process that has imported torch and bilevel
once (a fresh interpreter per attempt would spend most of the time importing).
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

DRIVER = r'''
import json, os, random, signal, sys, time
# imported once, before the forks
import PIL.Image, PIL.PngImagePlugin, skimage.data, sklearn.datasets, torch, torch._dynamo
from bilevel.cli import main
from bilevel.learning import job as _hpo_job  # noqa: F401
from bilevel.imaging import job as _imaging_job  # noqa: F401

spec = json.loads(sys.argv[1])


def attempt(argv, fault=None, kill_after=None):
    """Run `bilevel ARGV` in a forked child; SIGKILL it at a fault point or after a delay."""
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        if fault:
            os.environ["BILEVEL_FAULT"] = fault
        code = 3
        try:
            code = main(argv)
        finally:
            os._exit(code)
    start = time.monotonic()
    if kill_after is not None:
        while time.monotonic() - start < kill_after:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), time.monotonic() - start
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), time.monotonic() - start


out = {}
base = spec["argv"]
code, seconds = attempt(base + ["--run-dir", spec["reference"]])
out["reference"] = [code, seconds]
run_dir = spec["run_dir"]
rng = random.Random(spec["seed"])
log = []
for fault in spec["faults"]:
    kill_after = None
    if fault == "time":
        fault, kill_after = None, rng.uniform(0.05, 0.5) * seconds
    argv = base + ["--run-dir", run_dir]
    if os.path.exists(os.path.join(run_dir, "job.json")):
        argv.append("--resume")
    code, took = attempt(argv, fault=fault, kill_after=kill_after)
    log.append([fault or f"time:{kill_after:.2f}s", code, round(took, 2)])
code, took = attempt(base + ["--run-dir", run_dir, "--resume"])
log.append(["final", code, round(took, 2)])
out["attempts"] = log
print(json.dumps(out))
'''


def _strict(text: str):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def _check_every_file(run_dir: pathlib.Path) -> None:
    """Every file of the run directory parses; no temporary file is left behind."""
    from PIL import Image

    for path in sorted(run_dir.rglob("*")):
        if path.is_dir():
            continue
        name = path.name
        assert not name.startswith(".tmp-"), f"temporary file left: {path}"
        if name.endswith(".json"):
            _strict(path.read_text())
        elif name.endswith(".jsonl"):
            text = path.read_text()
            assert text.endswith("\n")
            for line in text.splitlines():
                _strict(line)
        elif name.endswith(".pt"):
            torch.load(path, weights_only=True)
        elif name.endswith(".png"):
            with Image.open(path) as img:
                img.verify()
        elif name.endswith(".csv"):
            rows = list(csv.reader(path.open()))
            assert len(rows) >= 2 and len({len(r) for r in rows}) == 1
        elif name.endswith(".html"):
            text = path.read_text(encoding="utf-8")
            assert text.lstrip().lower().startswith("<!doctype html") and "</html>" in text
        elif name == ".lock":
            assert path.read_text().strip().isdigit()
        else:
            raise AssertionError(f"unexpected file {path}")


def _final_theta(run_dir: pathlib.Path) -> list[torch.Tensor]:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]
    return state["engine"]["theta"]


def _faults(seed: int, checkpoints: int, steps: int, writes: int) -> list[str]:
    """Six kills at random moments: before the first checkpoint (after step 1), inside an
    atomic write, between the two renames of a checkpoint, in the middle of a metrics line,
    after step 2 or 3 of a session, and at a random time (within the first half of an
    uninterrupted run's duration; a resumed session may finish before it); and SIGTERM after
    a step, which writes a checkpoint and ends the run as interrupted (status 130)."""
    rng = random.Random(seed)
    return [
        "step:1",
        f"write:{rng.randint(1, writes)}",
        f"checkpoint:{rng.randint(1, checkpoints)}",
        f"step:{rng.randint(1, 2)}:TERM",
        f"log:{rng.randint(1, steps)}",
        f"step:{rng.randint(2, 3)}",
        "time",
    ]


JOBS = {
    "denoise": (
        [
            "denoise",
            "--filters",
            "2",
            "--filter-size",
            "3",
            "--crop",
            "12",
            "--train-size",
            "4",
            "--test-size",
            "2",
            "--batch-size",
            "2",
            "--budget",
            "2000",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "2",
            "--no-progress",
            "--no-plots",
            "--json",
        ],
        {"checkpoints": 2, "steps": 2, "writes": 4},
    ),
    "hpo": (
        [
            "hpo",
            "--data",
            "iris",
            "--steps",
            "16",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "2",
            "--no-progress",
            "--no-plots",
            "--json",
        ],
        {"checkpoints": 2, "steps": 2, "writes": 5},
    ),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_sigkill_at_random_moments_then_resume_is_bit_identical(job, tmp_path):
    argv, sizes = JOBS[job]
    seed = 16 + len(job)
    spec = {
        "argv": argv,
        "reference": str(tmp_path / "reference"),
        "run_dir": str(tmp_path / "run"),
        "faults": _faults(seed, **sizes),
        "seed": seed,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("BILEVEL_FAULT", None)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["reference"][0] == 0, report
    attempts = report["attempts"]
    killed = [a for a in attempts if a[1] == -9]
    assert len(killed) >= 5, attempts  # at least five of the six kills struck
    assert attempts[3][0].endswith(":TERM") and attempts[3][1] == 130, attempts
    assert attempts[-1][:2] == ["final", 0], attempts
    reference, run = tmp_path / "reference", tmp_path / "run"
    for a, b in zip(_final_theta(reference), _final_theta(run), strict=True):
        assert torch.equal(a, b), attempts
    if job == "denoise":  # the validation-selected θ and the last θ
        for name in ("model.pt", "model_final.pt"):
            got = torch.load(run / name, weights_only=True)
            expected = torch.load(reference / name, weights_only=True)
            assert all(torch.equal(got[k], expected[k]) for k in expected), name
    summary = _strict((run / "summary.json").read_text())
    assert summary["finished"] is True and summary["status"] == "budget"
    steps = [r["step"] for r in _strict_lines(run / "metrics.jsonl")]
    assert steps == list(range(len(steps))) and steps  # one record per step, none repeated
    _check_every_file(run)


def _strict_lines(path: pathlib.Path) -> list[dict]:
    return [_strict(line) for line in path.read_text().splitlines()]
