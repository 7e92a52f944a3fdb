"""Run directories, metrics logs, checkpoints, RNG state, progress output and plots."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import quadratic_problem

from bilevel.methods import ISGD, TensorSamples, ranked_by
from bilevel.problem import BilevelError
from bilevel.runs import (
    METRIC_KEYS,
    Progress,
    RunDirectory,
    RunLock,
    Stopwatch,
    atomic_output,
    check_resume,
    dumps_json,
    format_duration,
    plot_metrics,
    read_metrics,
    rng_state,
    rundir,
    save_torch,
    set_rng_state,
    to_jsonable,
    write_json,
    write_text,
)
from bilevel.schedules import Polynomial

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_json(line: str):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


# ----------------------------------------------------------------------------- configuration


def test_config_is_written_and_compared_on_resume(tmp_path):
    config = {
        "method": "isgd",
        "alpha": Polynomial(1e-2, 0.5),
        "budget": 1000,
        "solver": {"tol": 1e-3, "max_iter": 50, "budget": 5},
        "sizes": (3, 4),
        "out": tmp_path / "x",
    }
    run = RunDirectory(tmp_path / "run")
    stored = run.write_config(config)
    assert stored["alpha"] == {"kind": "polynomial", "initial": 0.01, "power": 0.5}
    assert stored["sizes"] == [3, 4]
    assert stored["out"] == str(tmp_path / "x")
    text = run.config_path.read_text()
    assert json.loads(text) == stored
    assert "\n  " in text  # pretty printed

    resumed = RunDirectory(tmp_path / "run", resume=True)
    assert resumed.write_config(config) == stored
    assert resumed.write_config(dict(config, budget=1000.0))["budget"] == 1000.0  # same number
    with pytest.raises(BilevelError, match="method: 'isgd' -> 'maid'"):
        resumed.write_config(dict(config, method="maid"))
    # an ignorable key (here, a larger budget) may change, and is updated
    more = dict(config, budget=2000)
    more["solver"] = dict(config["solver"], budget=9)
    resumed.write_config(more, ignore=("budget", "solver.budget"))
    assert resumed.read_config()["budget"] == 2000
    # any other difference refuses to resume and names the key
    changed = dict(more, solver=dict(more["solver"], tol=1e-4))
    with pytest.raises(BilevelError, match=r"solver\.tol: 0\.001 -> 0\.0001"):
        RunDirectory(tmp_path / "run", resume=True).write_config(changed, ignore=("budget",))
    with pytest.raises(BilevelError, match=r"budget: 2000 -> 3000"):
        RunDirectory(tmp_path / "run", resume=True).write_config(dict(more, budget=3000))
    with pytest.raises(BilevelError, match=r"extra \(new\)"):
        RunDirectory(tmp_path / "run", resume=True).write_config(
            dict(more, extra=1), ignore=("budget",)
        )
    assert RunDirectory(tmp_path / "run", resume=True).read_config()["budget"] == 2000


def test_new_run_refuses_to_overwrite_unless_asked(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.write_config({"a": 1})
    run.log({"step": 0})
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(BilevelError, match="already holds a run"):
        RunDirectory(tmp_path / "run")
    fresh = RunDirectory(tmp_path / "run", overwrite=True)
    assert fresh.read_config() is None
    assert fresh.read_metrics() == []
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(BilevelError, match="not a directory"):
        RunDirectory(tmp_path / "file")


# ----------------------------------------------------------------------------- metrics


def test_metrics_lines_are_strict_json_with_nan_and_tensors(tmp_path):
    run = RunDirectory(tmp_path)
    run.log(
        {
            "step": np.int64(3),
            "upper_loss": torch.tensor(0.25, dtype=torch.float64),
            "eps": np.float32(0.5),
            "bound": float("inf"),
            "delta": -math.inf,
            "alpha": float("nan"),
            "cost": torch.tensor(12),
            "grad": torch.tensor([1.0, float("nan")]),
            "converged": np.bool_(True),
            "note": "ok",
        }
    )
    run.log({"step": 4, "upper_loss": torch.tensor(float("nan"))})
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    first = _strict_json(lines[0])
    # non-finite values are null, with the reason under "non_finite"
    assert first["alpha"] is None and first["bound"] is None and first["delta"] is None
    assert first["grad"] == [1.0, None]
    assert first["non_finite"] == {
        "bound": "inf",
        "delta": "-inf",
        "alpha": "nan",
        "grad[1]": "nan",
    }
    records = run.read_metrics()
    assert records[0] == {
        "step": 3,
        "upper_loss": 0.25,
        "eps": 0.5,
        "bound": math.inf,
        "delta": -math.inf,
        "alpha": None,
        "cost": 12,
        "grad": [1.0, None],
        "converged": True,
        "note": "ok",
    }
    assert type(records[0]["step"]) is int and type(records[0]["converged"]) is bool
    assert records[1] == {"step": 4, "upper_loss": None}
    assert run.num_records == 2
    assert read_metrics(tmp_path) == records
    with pytest.raises(BilevelError, match="record.thing: cannot store a object"):
        run.log({"thing": object()})
    with pytest.raises(BilevelError, match="keys must be strings"):
        run.log({1: 2})
    assert run.num_records == 2
    assert "wall_time" in METRIC_KEYS and "bound" in METRIC_KEYS


def test_to_jsonable_and_partial_last_line(tmp_path):
    assert to_jsonable({"a": (1, 2.5, {3})}) == {"a": [1, 2.5, [3]]}
    assert to_jsonable(np.arange(3)) == [0, 1, 2]
    with pytest.raises(BilevelError, match="complex"):
        to_jsonable(1j)
    run = RunDirectory(tmp_path)
    run.log({"step": 0})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 1, "up')  # a write cut short by a crash
    assert run.read_metrics() == [{"step": 0}]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_previous_kept(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.load_checkpoint() is None
    theta = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([theta], lr=0.1)
    theta.grad = torch.ones(3)
    opt.step()
    run.save_checkpoint({"step": 1, "theta": theta.detach().clone(), "opt": opt.state_dict()})
    run.save_checkpoint({"step": 2, "theta": theta.detach() * 2, "opt": opt.state_dict()})
    state = RunDirectory(tmp_path, resume=True).load_checkpoint()
    assert state["step"] == 2
    torch.testing.assert_close(state["theta"], theta.detach() * 2)
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    opt2.load_state_dict(state["opt"])
    assert opt2.state_dict()["state"][0]["step"] == 1
    prev = torch.load(run.previous_checkpoint_path, weights_only=True)
    assert prev["state"]["step"] == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".lock", "checkpoint.prev.pt", "checkpoint.pt"]


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDirectory(tmp_path)
    run.log({"step": 0})
    run.save_checkpoint({"step": 1, "x": torch.arange(4)})
    run.log({"step": 1})
    before = run.checkpoint_path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint({"step": 2, "x": torch.arange(8)})
    monkeypatch.setattr(torch, "save", real_save)
    assert run.checkpoint_path.read_bytes() == before
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".lock", "checkpoint.pt", "metrics.jsonl"]
    resumed = RunDirectory(tmp_path, resume=True)
    state = resumed.load_checkpoint()
    assert state["step"] == 1
    torch.testing.assert_close(state["x"], torch.arange(4))
    assert resumed.read_metrics() == [{"step": 0}]


def test_unreadable_checkpoint_falls_back_to_previous(tmp_path):
    run = RunDirectory(tmp_path)
    run.save_checkpoint({"step": 1})
    run.save_checkpoint({"step": 2})
    run.checkpoint_path.write_bytes(b"garbage")
    (tmp_path / ".tmp-checkpoint.pt.123.abc").write_bytes(b"stale")
    resumed = RunDirectory(tmp_path, resume=True)
    assert not (tmp_path / ".tmp-checkpoint.pt.123.abc").exists()
    with pytest.warns(RuntimeWarning, match="checkpoint.prev.pt"):
        assert resumed.load_checkpoint() == {"step": 1}
    run.previous_checkpoint_path.write_bytes(b"garbage too")
    with pytest.raises(BilevelError, match="no readable checkpoint"):
        RunDirectory(tmp_path, resume=True).load_checkpoint()


def _noisy_run(path, steps, *, resume=False, crash_at=None, every=3):
    """A miniature training loop: random draws from every generator, logged each step."""
    run = RunDirectory(path, resume=resume)
    run.write_config({"steps": steps, "every": every}, ignore=("steps",))
    gen = torch.Generator().manual_seed(5)
    np_gen = np.random.default_rng(7)
    theta = torch.zeros(2)
    start = 0
    if not resume:
        torch.manual_seed(0)
        np.random.seed(0)  # noqa: NPY002
        random.seed(0)
    state = run.load_checkpoint()
    if state is not None:
        set_rng_state(state["rng"], {"batches": gen, "noise": np_gen})
        theta, start = state["theta"], state["step"]
    for k in range(start, steps):
        theta = theta + torch.randn(2, generator=gen) + torch.rand(2)
        draw = float(np_gen.normal()) + float(np.random.rand()) + random.random()  # noqa: NPY002
        run.log({"step": k, "upper_loss": theta.norm(), "draw": draw})
        if crash_at is not None and k == crash_at:
            raise KeyboardInterrupt
        if (k + 1) % every == 0:
            run.save_checkpoint(
                {
                    "step": k + 1,
                    "theta": theta,
                    "rng": rng_state({"batches": gen, "noise": np_gen}),
                }
            )
    return run.read_metrics()


def test_resumed_run_log_equals_uninterrupted_log(tmp_path):
    reference = _noisy_run(tmp_path / "a", 10)
    assert [r["step"] for r in reference] == list(range(10))
    with pytest.raises(KeyboardInterrupt):
        _noisy_run(tmp_path / "b", 10, crash_at=7)  # checkpoint at 6, lines for 0..7 written
    assert len(read_metrics(tmp_path / "b")) == 8
    # disturb the global generators, as a new process would
    torch.manual_seed(123)
    random.seed(123)
    resumed = _noisy_run(tmp_path / "b", 10, resume=True)
    assert resumed == reference
    # resuming a finished run with a larger budget continues the same sequence
    longer = _noisy_run(tmp_path / "a", 12, resume=True)
    assert longer[:10] == reference and len(longer) == 12


def test_resume_without_checkpoint_restarts_log(tmp_path):
    run = RunDirectory(tmp_path)
    run.log({"step": 0})
    run.log({"step": 1})
    resumed = RunDirectory(tmp_path, resume=True)
    resumed.log({"step": 0, "again": True})  # logging syncs with the (absent) checkpoint
    assert resumed.read_metrics() == [{"step": 0, "again": True}]


def test_rng_state_round_trip_reproduces_numbers(tmp_path):
    gen = torch.Generator().manual_seed(1)
    np_gen = np.random.default_rng(2)
    torch.rand(3)
    state = rng_state({"g": gen, "n": np_gen})

    def draw():
        return (
            torch.rand(4).tolist(),
            torch.randn(3, generator=gen).tolist(),
            np.random.rand(2).tolist(),  # noqa: NPY002
            np.random.randn(),  # noqa: NPY002 (uses the cached Gaussian state)
            np_gen.random(3).tolist(),
            [random.random(), random.gauss(0, 1)],
        )

    first = draw()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    set_rng_state(torch.load(path, weights_only=True), {"g": gen, "n": np_gen})
    assert draw() == first
    with pytest.raises(BilevelError, match="holds generators"):
        set_rng_state(state)
    with pytest.raises(BilevelError, match="not a state"):
        set_rng_state({"torch": state["torch"]})


def test_stopwatch_continues_from_offset():
    watch = Stopwatch(offset=10.0)
    assert 10.0 <= watch.elapsed() < 20.0
    other = Stopwatch()
    other.load_state_dict(watch.state_dict())
    assert other.elapsed() >= 10.0
    with pytest.raises(BilevelError):
        Stopwatch(-1.0)


# ----------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_plain_lines_are_throttled(capsys):
    clock = FakeClock()
    bar = Progress(1000, unit="calls", description="isgd", clock=clock, tty=False)
    for i in range(1, 21):
        clock.now += 1.0
        bar.update(50 * i, loss=1.0 / i, cost=50 * i)
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    # first update, then every 5 s of the 20, then the final state
    assert len(lines) == 5
    assert lines[0].startswith("isgd:   5.0% |#")
    assert "50/1000 calls" in lines[0] and "loss=1 " in lines[0] and "cost=50" in lines[0]
    assert "[0:01<0:19]" in lines[0]
    assert lines[-1].startswith("isgd: 100.0% |####################|")
    assert "1000/1000 calls [0:20<0:00] loss=0.05 cost=1000" in lines[-1]
    bar.close()
    assert capsys.readouterr().err == ""


def test_progress_disabled_and_tty_modes(capsys):
    with Progress(10, enabled=False) as bar:
        bar.update(5, loss=1.0)
        bar.write("hello")
    assert capsys.readouterr().err == ""

    # on a terminal, tqdm redraws the bar in place; messages go on their own lines
    stream = io.StringIO()
    clock = FakeClock()
    with Progress(4, stream=stream, tty=True, clock=clock, initial=1, unit="calls") as bar:
        assert math.isnan(bar.eta)
        for done in (2, 3, 4):
            clock.now += 0.5
            bar.update(done, loss=torch.tensor(0.5))
            if done == 3:
                bar.write("halfway")
        assert bar.eta == 0.0
    out = stream.getvalue()
    assert "\r" in out and out.endswith("\n") and "halfway\n" in out
    last = out.rstrip("\n").split("\r")[-1]
    assert "100%" in last and "4/4" in last and "calls" in last and "loss=0.5" in last


def test_progress_eta_and_validation():
    clock = FakeClock()
    bar = Progress(100, clock=clock, enabled=False, initial=20)
    clock.now += 10.0
    bar.update(40)
    assert bar.eta == pytest.approx(30.0)  # 20 units per 10 s, 60 left
    assert bar.fraction == pytest.approx(0.4)
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
    assert format_duration(math.nan) == "?"
    with pytest.raises(BilevelError, match="finite and positive"):
        Progress(0)


# ----------------------------------------------------------------------------- plots


def _records(n=12, scale=1.0):
    return [
        {
            "step": k,
            "cost": 100 * (k + 1),
            "wall_time": 0.1 * k,
            "upper_loss": scale * 10.0 ** (-k / 3),
            "alpha": 0.1,
            "bound": None if k == 0 else 1.0 / k,
            "label": "text is ignored",
        }
        for k in range(n)
    ]


def test_plot_metrics_writes_png_files(tmp_path):
    run = RunDirectory(tmp_path / "run")
    for r in _records():
        run.log(r)
    paths = plot_metrics(run)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{y}_vs_{x}.png" for y in ("upper_loss", "alpha", "bound") for x in ("cost", "wall_time")
    )
    for p in paths:
        assert p.parent == tmp_path / "run" / "plots"
        assert p.read_bytes()[:8] == PNG_SIGNATURE

    out = plot_metrics(
        {"isgd": _records(), "maid": tmp_path / "run" / "metrics.jsonl"},
        tmp_path / "cmp",
        x_keys="cost",
        y_keys=["upper_loss", "missing"],
    )
    assert [p.name for p in out] == ["upper_loss_vs_cost.png"]
    assert out[0].read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(BilevelError, match="needs out_dir"):
        plot_metrics(_records())


def test_plots_without_matplotlib_say_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"bilevel\[plots\]"):
        plot_metrics(_records(), tmp_path)


# ----------------------------------------------------------------------------- lock, atomic files


@contextlib.contextmanager
def lock_held_by_another_process(path):
    """A forked process holds the RunLock of ``path`` inside the block; yields its PID."""
    go, hold = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: take the lock, say so, wait for the end of the block
        try:
            os.close(hold)
            RunLock(path).acquire()
            os.write(ready_w, b"1")
            os.read(go, 1)
        finally:
            os._exit(0)
    os.close(go)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
        yield pid
    finally:
        os.close(hold)
        os.close(ready_r)
        os.waitpid(pid, 0)


def test_a_second_writer_fails_fast_naming_the_holder(tmp_path):
    """Two writers on one run directory interleaved metrics.jsonl or deleted each other's
    temporary files; now the second fails at once and names the first one's PID."""
    with lock_held_by_another_process(tmp_path) as holder:
        with pytest.raises(BilevelError, match=f"in use by another run \\(process {holder}\\)"):
            RunDirectory(tmp_path)
        with pytest.raises(BilevelError, match=str(holder)):
            RunLock(tmp_path).acquire()
    # the lock dies with its holder; within one process it is re-entrant
    with RunLock(tmp_path), RunDirectory(tmp_path) as run:
        run.log({"step": 0})
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


def test_run_directory_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BilevelError, match="is not a directory"):
        RunDirectory(tmp_path / "file")
    with pytest.raises(BilevelError, match="cannot write to the run directory"):
        RunDirectory(tmp_path / "file" / "run")  # cannot be created
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(BilevelError, match="cannot write to the run directory"):
            RunDirectory(locked / "run")
    finally:
        locked.chmod(0o700)


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="crash"), atomic_output(target) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    save_torch(tmp_path / "model.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.arange(3))
    write_text(tmp_path / "note.txt", "ok\n")
    assert (tmp_path / "note.txt").read_text() == "ok\n"


def test_non_finite_values_are_null_with_a_reason_and_restored():
    text = dumps_json({"psnr": math.inf, "nested": {"x": [1.0, -math.inf]}, "nan": math.nan})
    data = _strict_json(text)
    assert data["psnr"] is None and data["nested"]["x"] == [1.0, None] and data["nan"] is None
    assert data["non_finite"] == {"psnr": "inf", "nested.x[1]": "-inf", "nan": "nan"}
    restored = rundir._restore_infinities(data)
    assert restored == {"psnr": math.inf, "nested": {"x": [1.0, -math.inf]}, "nan": None}
    assert _strict_json(dumps_json({"a": 1})) == {"a": 1}  # nothing added when all finite


def test_damaged_job_record_is_a_clear_error(tmp_path):
    (tmp_path / "job.json").write_text('{"job": "deno')
    with pytest.raises(BilevelError, match="job.json is damaged"):
        check_resume(tmp_path / "job.json", {"job": "denoise"})


def test_one_resume_check_for_job_records(tmp_path):
    """``job.json`` goes through the same check as the run loop's ``config.json``: every
    difference named, ignored keys skipped, no stored file no check."""
    check_resume(tmp_path / "job.json", {"a": 1})  # nothing stored yet
    (tmp_path / "job.json").write_text('{"job": "denoise", "crop": 32, "budget": 10}')
    check_resume(
        tmp_path / "job.json", {"job": "denoise", "crop": 32, "budget": 99}, ignore=("budget",)
    )
    with pytest.raises(
        BilevelError, match=r"crop: 32 -> 16.*budget \(missing\)|budget.*crop: 32 -> 16"
    ):
        check_resume(tmp_path / "job.json", {"job": "denoise", "crop": 16})


# ----------------------------------------------------------------------------- metrics repair


@pytest.mark.parametrize("damage", ["one_line_short", "extra_lines", "garbage_line"])
def test_metrics_are_repaired_to_the_checkpoint_on_resume(tmp_path, damage):
    """A metrics.jsonl one line short made resume refuse although the checkpoint was fine."""
    run = RunDirectory(tmp_path)
    for k in range(5):
        run.log({"step": k})
    run.save_checkpoint({"step": 5})
    run.log({"step": 5})
    lines = run.metrics_path.read_text().splitlines(keepends=True)
    if damage == "one_line_short":
        run.metrics_path.write_text("".join(lines[:3] + lines[4:5]))  # step 3 lost
    elif damage == "extra_lines":
        run.metrics_path.write_text("".join(lines) + '{"step": 6}\n{"step": 7')
    else:
        run.metrics_path.write_text("".join(lines[:2]) + "{not json\n" + "".join(lines[2:]))
    resumed = RunDirectory(tmp_path, resume=True)
    if damage == "extra_lines":
        assert resumed.load_checkpoint() == {"step": 5}
        assert [r["step"] for r in resumed.read_metrics()] == [0, 1, 2, 3, 4]
    else:
        with pytest.warns(RuntimeWarning, match="records stay missing"):
            assert resumed.load_checkpoint() == {"step": 5}
        steps = [r["step"] for r in resumed.read_metrics()]
        assert steps == ([0, 1, 2, 4] if damage == "one_line_short" else [0, 1, 2, 3, 4])
    resumed.log({"step": 5})
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [4, 5]


# ----------------------------------------------------------------------------- run loop


def _isgd_run(run_dir, steps, *, evaluate=None, resume=False, eval_every=1):
    torch.manual_seed(0)  # a fresh process; a resumed run restores the generators it saved
    problem, batch, _ = quadratic_problem(n_batch=6)
    samples = TensorSamples(batch, x_init=torch.zeros(6, 6, dtype=torch.float64))
    method = ISGD(step=0.02, batch_size=2, seed=1)
    return method.run(
        problem,
        samples,
        {"steps": steps},
        run_dir=run_dir,
        resume=resume,
        evaluate=evaluate,
        eval_every=eval_every,
        checkpoint_every=2,
        progress=False,
        plot=False,
        keep_history=True,
    )


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    reference = _isgd_run(tmp_path / "ref", 7)

    def terminate(theta, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    stopped = _isgd_run(tmp_path / "run", 7, evaluate=terminate)
    assert stopped.status == "interrupted" and "SIGTERM" in stopped.message
    assert not stopped.finished
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "interrupted" and result["finished"] is False
    state = RunDirectory(tmp_path / "run", resume=True).load_checkpoint()
    assert state["engine"]["step"] == 3
    resumed = _isgd_run(tmp_path / "run", 7, resume=True)
    assert resumed.status == "budget" and torch.equal(resumed.theta[0], reference.theta[0])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is restored


def test_wall_time_accumulates_over_resumes(tmp_path):
    first = _isgd_run(tmp_path, 4)
    second = _isgd_run(tmp_path, 8, resume=True)
    walls = [r["wall_time"] for r in second.records]
    assert walls == sorted(walls) and second.wall_time >= first.wall_time
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["wall_time"] == pytest.approx(second.wall_time)


def test_best_theta_by_evaluation_is_kept_checkpointed_and_resumed(tmp_path):
    """A run whose evaluations get worse after step 3 keeps θ_3 as its best, beside the last."""
    score = {k: (k - 3) ** 2 + 0.5 for k in range(20)}  # best at step 3

    def evaluate(theta, step):
        return {"val_loss": score[step]}

    ranked = ranked_by(evaluate, "val_loss", "min")
    whole = _isgd_run(tmp_path / "a", 8, evaluate=ranked)
    assert whole.best == {"metric": "val_loss", "mode": "min", "step": 3, "value": 0.5}
    assert torch.equal(whole.best_theta[0], whole.history[3][0])
    assert not torch.equal(whole.best_theta[0], whole.theta[0])
    stored = json.loads((tmp_path / "a" / "result.json").read_text())
    assert stored["best"]["step"] == 3
    # interrupted after the best step, then resumed: the best survives the checkpoint
    _isgd_run(tmp_path / "b", 5, evaluate=ranked)
    resumed = _isgd_run(tmp_path / "b", 8, evaluate=ranked, resume=True)
    assert resumed.best == whole.best and torch.equal(resumed.best_theta[0], whole.best_theta[0])
    # "max" ranks the other way (steps 0, 1, 2 and the final 3: 9.5, 4.5, 1.5, 0.5)
    maximised = _isgd_run(tmp_path / "c", 3, evaluate=ranked_by(evaluate, "val_loss", "max"))
    assert maximised.best["step"] == 0 and maximised.best["value"] == 9.5
    # without a ranking there is no best
    assert _isgd_run(tmp_path / "d", 3, evaluate=evaluate).best_theta is None
    with pytest.raises(BilevelError, match="mode"):
        ranked_by(evaluate, "val_loss", "lowest")


def test_mixed_dtypes_are_refused_before_the_run(tmp_path):
    problem, batch, _ = quadratic_problem(n_batch=4)  # θ is float64
    samples = TensorSamples(tuple(t.float() for t in batch), x_init=torch.zeros(4, 6))
    with pytest.raises(BilevelError, match="training data are float32 but θ is float64"):
        ISGD(step=0.1, batch_size=2).run(problem, samples, {"steps": 2}, progress=False)
