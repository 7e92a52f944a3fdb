"""Data-parallel runs (bilevel.distributed): gloo on CPU, processes spawned by
torch.multiprocessing. An N = 2 run must follow the single-process trajectory (float64,
≤ 1e-5 relative), checkpoints must resume on another number of processes, and a rank that
dies must stop the others with a clear message."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel import distributed, stochastic
from bilevel.learning.models import _rows, ridge_model
from bilevel.methods import ISGD, MAID, TensorSamples
from bilevel.methods.testing import quadratic_finite_sum
from bilevel.problem import BilevelError
from bilevel.stochastic import (
    SID,
    StochasticFixedPoint,
    StochasticLinearFixedPoint,
    VarianceReducedFixedPoint,
)

TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, timeout: float) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    distributed.init_from_env(timeout=timeout, backend="gloo")


def _spawn(fn, world: int, *args) -> list[int | None]:
    """Run fn(rank, world, port, *args) in ``world`` fresh processes; their exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


# ---------------------------------------------------------------------------- the problems


def _isgd(steps_budget: int, run_dir: Path | None = None, resume: bool = False, **options):
    q = quadratic_finite_sum(n=10, dim=6, n_params=3, seed=1)
    method = ISGD(
        step=0.3,
        accuracy=1e-10,
        batch_size=5,
        optimizer="adam",
        # no ω (ISGD does not use it): its computation costs per call, not per instance
        estimator=dataclasses.replace(q.estimator(), compute_bound=False),
        seed=3,
    )
    result = method.run(
        q.problem,
        q.samples,
        {"steps": steps_budget},
        run_dir=run_dir,
        resume=resume,
        checkpoint_every=2,
        progress=False,
        plot=False,
        **options,
    )
    return result


def _maid(steps: int):
    q = quadratic_finite_sum(n=6, dim=5, n_params=3, seed=2)
    result = MAID(estimator=q.estimator(), lower_tol=1e-6, step=0.5).run(
        q.problem, q.samples, {"steps": steps}, progress=False, plot=False
    )
    return result


def _ridge_model():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(4, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        90, generator=gen, dtype=torch.float64
    )
    return ridge_model(X[:60], y[:60], X[60:], y[60:], 0.0)


def _sid_run(steps: int, minibatch: bool, adjoint_steps: int = 30):
    model = _ridge_model()
    eta = 1.0 / model.smoothness()
    if minibatch:
        sid = SID(
            lower_solver=VarianceReducedFixedPoint(15, 0.5, refresh=5),
            linear_solver=StochasticLinearFixedPoint.constant(0.5, 15),
            step=eta,
            lower_batch=10,
            linear_batch=10,
            final_batch=10,
            seed=4,
        )
    else:  # full batches and unit steps: deterministic AID-FP, whatever the sampling
        sid = SID(
            lower_solver=StochasticFixedPoint.constant(1.0, 30),
            linear_solver=StochasticLinearFixedPoint.constant(1.0, adjoint_steps),
            step=eta,
            lower_batch=None,
            linear_batch=None,
            final_batch=None,
        )
    samples = TensorSamples(x_init=model.init_w(model.n_instances))
    state = sid.init_state()  # the run assigns this process's streams to it
    result = ISGD(step=0.5, batch_size=1, estimator=sid).run(
        model.problem, samples, {"steps": steps}, progress=False, plot=False, estimator_state=state
    )
    return result, state


class _Collectives:
    """Counts this process's all-reduces and broadcasts (torch.distributed's functions
    wrapped while it is active)."""

    def __enter__(self) -> _Collectives:
        self.count = 0
        self.saved = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counted(fn))
        return self

    def _counted(self, fn):
        def wrapped(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return wrapped

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _scenarios(rank: int, world: int, port: int, out: str) -> None:
    """Every two-process scenario in one pair of processes (each costs seconds to start)."""
    _join(rank, world, port, TIMEOUT)
    shard = distributed.current()
    parts = [
        (torch.arange(5, dtype=torch.float32) * (rank + 1), 7),
        (torch.full((2, 3), float(rank + 1), dtype=torch.float64), 8),
        (torch.tensor([rank + 1.0, 2.0], dtype=torch.float64), None),
    ]
    with _Collectives() as fused:
        combined = shard.combine_all(parts)
    separate = [shard.sum(t) if n is None else shard.combine(t, n) for t, n in parts]
    isgd = _isgd(6, run_dir=Path(out) / "isgd")
    maid = _maid(4)
    sid_full, _ = _sid_run(3, minibatch=False)
    sid_k0, _ = _sid_run(2, minibatch=False, adjoint_steps=0)
    with _Collectives() as sid_collectives:
        sid_mini, sid_state = _sid_run(3, minibatch=True)
    maps = (stochastic._Lookahead, stochastic.AdjointMap)
    working_ahead = [m.__dict__["_meanwhile"] for m in maps]
    for m in maps:  # nothing in the waits
        m._meanwhile = lambda self, device: None
    try:
        sid_plain, _ = _sid_run(3, minibatch=True)
    finally:
        for m, fn in zip(maps, working_ahead):
            m._meanwhile = fn
    from_one = _isgd(6, run_dir=Path(out) / "one", resume=True)  # a 3-step single-process run
    torch.save(
        {
            "isgd": isgd.theta[0],
            "isgd_cost": isgd.cost,
            "isgd_loss": [r["upper_loss"] for r in isgd.records],
            "maid": maid.theta[0],
            "maid_accepted": [r["accepted"] for r in maid.records],
            "sid_full": sid_full.theta[0],
            "sid_k0_loss": [r["upper_loss"] for r in sid_k0.records],
            "sid_mini": sid_mini.theta[0],
            "sid_plain": sid_plain.theta[0],
            "sid_seed": sid_state.samplers.lower.seed,
            "from_one": from_one.theta[0],
            "combined": combined,
            "separate": separate,
            "fused_collectives": fused.count,
            "sid_collectives": sid_collectives.count,
        },
        Path(out) / f"rank{rank}.pt",
    )
    # last: rank 1 dies (SIGKILL after its fifth step); rank 0 must stop with a message
    if rank == 1:
        os.environ["BILEVEL_FAULT"] = "step:5"
    start = time.perf_counter()
    try:
        _isgd(8, run_dir=Path(out) / "dies")
    except distributed.DistributedError as err:
        (Path(out) / "dies.txt").write_text(f"{time.perf_counter() - start}\n{err}")
    # rank 0 ends as a script should, through distributed.leave: status 0 (asserted by the
    # fixture), where the interpreter's exit could let gloo's destructors abort it (SIGABRT)
    distributed.leave(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@functools.cache
def _single(name: str, steps: int):
    """The single-process reference runs (computed once)."""
    if name == "isgd":
        return _isgd(steps)
    if name == "maid":
        return _maid(steps)
    if name == "sid_k0":
        return _sid_run(steps, minibatch=False, adjoint_steps=0)[0]
    return _sid_run(steps, minibatch=name == "sid_mini")[0]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    _isgd(3, run_dir=out / "one")  # a single-process checkpoint, resumed by two processes
    codes = _spawn(_scenarios, 2, str(out))
    # rank 1 was killed in the last scenario; rank 0 exits with status 0, not SIGABRT (-6)
    assert codes[0] == 0 and codes[1] != 0
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_two_processes_follow_the_single_process_trajectory(two_ranks):
    out, ranks = two_ranks
    single = _single("isgd", 6)
    for r in ranks:
        assert _close(r["isgd"], single.theta[0]) <= 1e-5
        assert r["isgd_cost"] == pytest.approx(single.cost, rel=1e-12)
        assert r["isgd_loss"] == pytest.approx([x["upper_loss"] for x in single.records])
    assert not torch.equal(single.theta[0], torch.zeros(3))  # θ moved
    maid = _single("maid", 4)
    assert [x["accepted"] for x in maid.records] == ranks[0]["maid_accepted"]
    sid_full = _single("sid_full", 3)
    for r in ranks:
        assert _close(r["maid"], maid.theta[0]) <= 1e-5
        assert _close(r["sid_full"], sid_full.theta[0]) <= 1e-5
    # no adjoint iteration (k = 0): the exact upper terms are combined with stage 3's products
    sid_k0 = [x["upper_loss"] for x in _single("sid_k0", 2).records]
    for r in ranks:
        assert r["sid_k0_loss"] == pytest.approx(sid_k0, rel=1e-10)


def test_poll_seconds_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.POLL_VARIABLE, raising=False)
    assert distributed._poll("gloo") == distributed.DEFAULT_POLL > 0
    assert distributed._poll("nccl") == 0.0
    monkeypatch.setenv(distributed.POLL_VARIABLE, "0")
    assert distributed._poll("gloo") == 0.0
    monkeypatch.setenv(distributed.POLL_VARIABLE, "0.01")
    assert distributed._poll("nccl") == 0.01
    for bad in ("soon", "-1", "inf"):
        monkeypatch.setenv(distributed.POLL_VARIABLE, bad)
        with pytest.raises(BilevelError, match=distributed.POLL_VARIABLE):
            distributed._poll("gloo")


def test_combine_all_is_the_separate_combinations_in_one_all_reduce(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert r["fused_collectives"] == 1
        for a, b in zip(r["combined"], r["separate"]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.allclose(a, b, rtol=1e-6)
    # rank r holds (r + 1)·t; blocks of 7 rows split 3 + 4, of 8 rows 4 + 4
    assert torch.allclose(ranks[0]["combined"][0], torch.arange(5.0) * (3 / 7 + 2 * 4 / 7))
    assert torch.equal(ranks[0]["combined"][2], torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_sid_synchronises_once_per_inner_iteration(two_ranks):
    # 3 steps of t = k = 15 (SVRG anchors every 5 iterations, fused with a step's minibatch
    # gradients; the exact upper terms fused with stage 2's first products): per step t + k
    # all-reduces, one for stage 3 and the oracle counts, and the broadcast of rank 0's budget
    # decision; the start of the run (rank 0's checkpoint) and its end add one each. Separate
    # all-reduces made 54 per step.
    _, ranks = two_ranks
    for r in ranks:
        assert r["sid_collectives"] == 3 * (15 + 15 + 2) + 2


def test_sid_ranks_draw_own_streams_and_agree_on_theta(two_ranks):
    _, ranks = two_ranks
    single, sid_state = _sid_run(3, minibatch=True)
    assert torch.equal(ranks[0]["sid_mini"], ranks[1]["sid_mini"])  # same step on every rank
    assert (
        ranks[0]["sid_seed"] == sid_state.samplers.lower.seed
    )  # rank 0: the single-process stream
    assert ranks[1]["sid_seed"] != ranks[0]["sid_seed"]
    # the work done in the all-reduces' waits leaves every rank's iterates bit for bit
    for r in ranks:
        assert torch.equal(r["sid_mini"], r["sid_plain"])
    # another estimate of the same hypergradient: close, not equal, to one process's
    assert _close(ranks[0]["sid_mini"], single.theta[0]) < 0.2


def test_checkpoint_of_two_processes_resumes_on_one(two_ranks, tmp_path):
    out, _ = two_ranks
    resumed_dir = tmp_path / "isgd"
    # the two-process run's final checkpoint (step 6), continued alone
    state = torch.load(out / "isgd" / "checkpoint.pt", weights_only=True)["state"]
    assert state["engine"]["step"] == 6 and len(state["rank_rng"]) == 2
    shutil.copytree(out / "isgd", resumed_dir)
    more = _isgd(9, run_dir=resumed_dir, resume=True)
    reference = _single("isgd", 9).theta[0]
    assert more.step == 9
    assert _close(more.theta[0], reference) <= 1e-5
    assert _close(_single("isgd", 6).theta[0], reference) > 1e-3  # 3 more steps moved θ


def test_checkpoint_of_one_process_resumes_on_two(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        assert _close(r["from_one"], _single("isgd", 6).theta[0]) <= 1e-5


def test_a_dead_rank_stops_the_others_and_the_checkpoint_resumes(two_ranks):
    out, _ = two_ranks
    seconds, message = (out / "dies.txt").read_text().split("\n", 1)
    assert float(seconds) < TIMEOUT + 15.0  # the run itself takes a few seconds
    assert "rank 0 of 2" in message and "resume" in message
    state = torch.load(out / "dies" / "checkpoint.pt", weights_only=True)["state"]
    assert state["engine"]["step"] == 4  # the last periodic checkpoint
    resumed = _isgd(8, run_dir=out / "dies", resume=True)
    assert _close(resumed.theta[0], _single("isgd", 8).theta[0]) <= 1e-5


def _peer_exits(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port, TIMEOUT)
    shard = distributed.current()
    for _ in range(3):
        shard.sum(torch.ones(4))
    if rank == 1:
        os._exit(3)
    try:
        shard.sum(torch.ones(4))
    except distributed.DistributedError as err:
        Path(out).write_text(str(err))
        distributed.leave(1)  # no barrier after a failed collective: status 1 at once


@pytest.mark.slow
def test_survivor_of_a_dead_peer_exits_with_its_status_not_an_abort(tmp_path):
    # distributed.leave ends the survivor without running gloo's C++ destructors, which can
    # abort a process whose peer has died ("terminate called without an active exception",
    # -6): 2 of 3 plain torch.distributed pairs ended so, and the interpreter's exit after
    # destroy_process_group still did occasionally (the fixture above, once)
    codes = [_spawn(_peer_exits, 2, str(tmp_path / f"error{i}.txt")) for i in range(2)]
    assert codes == [[1, 3]] * 2
    assert "rank 0 of 2: an all-reduce failed" in (tmp_path / "error0.txt").read_text()


@pytest.mark.slow
def test_command_line_survivor_exits_with_a_message_and_the_run_resumes(tmp_path):
    # `python -m bilevel hpo` on two processes (torchrun's environment variables set by hand);
    # rank 1 is killed (SIGKILL) after its fifth step
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "bilevel", "hpo", "--data", "synthetic:2000:5"]
    args += ["--method", "sid", "--init", "0", "--steps", "8", "--checkpoint-every", "2"]
    args += ["--eval-every", "100", "--run-dir", str(run_dir), "--no-progress", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(_free_port()), WORLD_SIZE="2", BILEVEL_DIST_TIMEOUT=str(TIMEOUT))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(distributed.__file__).parents[1]), *sys.path])
    procs = [
        subprocess.Popen(
            args,
            env={**env, "RANK": str(r), **({"BILEVEL_FAULT": "step:5"} if r else {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    start = time.perf_counter()
    survivor = procs[0].communicate(timeout=120)[1]
    seconds = time.perf_counter() - start
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 1, survivor  # not SIGABRT (-6) in gloo's teardown
    assert "terminate called" not in survivor
    assert "DistributedError: rank 0 of 2" in survivor and "--resume" in survivor
    assert seconds < 60 + TIMEOUT
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]
    assert state["engine"]["step"] == 4
    # one process continues the run from the checkpoint of step 4
    single = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "MASTER_PORT")}
    resumed = subprocess.run(
        [*args, "--resume"], env=single, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "result.json").read_text())["step"] == 8


@pytest.mark.slow
def test_command_line_processes_that_finish_all_exit_with_status_zero(tmp_path):
    # `python -m bilevel hpo` on two processes that both finish: each leaves through
    # distributed.leave (barrier, os._exit), not through gloo's destructors, which aborted 1
    # of 6 such torchrun runs (SIGABRT, and torchrun then reports the job as failed)
    args = [sys.executable, "-m", "bilevel", "hpo", "--data", "synthetic:1000:4"]
    args += ["--method", "sid", "--init", "0", "--steps", "2", "--eval-every", "100"]
    args += ["--no-progress", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}
    env["BILEVEL_DIST_TIMEOUT"] = str(TIMEOUT)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(distributed.__file__).parents[1]), *sys.path])
    for run in range(3):
        env["MASTER_PORT"] = str(_free_port())
        procs = [
            subprocess.Popen(
                [*args, "--run-dir", str(tmp_path / f"run{run}")],
                env={**env, "RANK": str(r)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(2)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outputs
        assert "result" in outputs[0][0] or (tmp_path / f"run{run}" / "result.json").is_file()
        assert outputs[1][0] == ""  # rank 1 prints nothing on stdout
        assert all("terminate called" not in err for _, err in outputs)


def test_a_block_of_rows_is_read_as_a_view():
    # a process's contiguous block (SID's full gradients and exact upper terms) is not copied
    X = torch.randn(10, 3)
    block = _rows(X, torch.arange(2, 7))
    assert block.data_ptr() == X[2].data_ptr() and torch.equal(block, X[2:7])
    for idx in ([1, 3, 4], [4, 5, 5, 6], [6, 5, 4], [7]):
        assert torch.equal(_rows(X, torch.tensor(idx)), X[idx])
