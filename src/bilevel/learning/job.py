"""``bilevel hpo`` as a library function: :func:`run` takes an
:class:`~bilevel.learning.config.HpoConfig`, checks it, locks the run directory, writes
``job.json`` (the effective configuration), learns θ with the method of
:func:`~bilevel.learning.hpo.hpo_method` and writes ``summary.json``, ``hyperparameters.csv``,
plots and ``report.html``. The pieces it assembles are in :mod:`bilevel.learning.hpo` (data,
models, estimators, method) and :mod:`bilevel.learning.evaluation` (F(θ), the baseline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from bilevel import distributed
from bilevel.config import Invocation, job_record, resumable_fields, resume_command
from bilevel.learning.config import DEFAULT_METHOD_RULE, HpoConfig
from bilevel.learning.datasets import SplitData
from bilevel.learning.evaluation import (
    EVALUATION_SHARE,
    LowerEvaluator,
    ThrottledEvaluation,
    guard_sid,
    lower_instances,
    single_strength_baseline,
)
from bilevel.learning.hpo import (
    DEFAULT_THETA_RANGE,
    box_projection,
    build_model,
    data_for,
    default_method,
    default_shrinkage,
    hpo_method,
    load_data,
    store_for,
)
from bilevel.learning.models import FiniteSumModel, HypercleaningModel
from bilevel.learning.report import (
    BEST_HYPERPARAMETERS_FILE,
    HYPERPARAMETERS_FILE,
    plot_hyperparameters,
    write_hyperparameters,
    write_report,
)
from bilevel.methods import Budget, RunResult, ranked_by
from bilevel.problem import BilevelError
from bilevel.runs import (
    RunLock,
    check_resume,
    dumps_json,
    to_jsonable,
    write_json,
)
from bilevel.schedules import as_schedule

__all__ = ["JOB_FILES", "TRACKING_WARNING", "lower_level_gap", "run", "sid_capped"]

T = TypeVar("T")


def _parse_shrinkage(value: float | None, model: str) -> float | None:
    """--shrinkage: ρ, or None for :func:`default_shrinkage`; hypercleaning takes none."""
    if model == "hypercleaning":
        if value:
            raise BilevelError("--shrinkage applies to the logistic and ridge models only")
        return 0.0
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise BilevelError(f"--shrinkage must be a finite number >= 0, got {value}")
    return value


def _parse_range(text: str | None, model: str) -> tuple[float, float]:
    if text is None:
        return DEFAULT_THETA_RANGE[model]
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise BilevelError(f"--theta-range must be two numbers LO,HI, got {text!r}") from None
    box_projection(lo, hi)
    return lo, hi


def _parse_init(text: str) -> float | None:
    """``None`` for 'baseline', else the number."""
    if text == "baseline":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BilevelError(f"--init must be 'baseline' or a number, got {text!r}") from None
    if not math.isfinite(value):
        raise BilevelError(f"--init must be finite, got {text!r}")
    return value


def _default_run_dir(data: str, method: str) -> pathlib.Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", pathlib.Path(data).name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = pathlib.Path("runs") / f"hpo-{stamp}-{stem}-{method}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _budget(config: HpoConfig) -> Budget:
    steps = config.steps
    if config.budget is None and config.time is None and steps is None:
        steps = 100
    try:
        return Budget(
            oracle_calls=None if config.budget is None else int(math.ceil(config.budget)),
            steps=steps,
            wall_time=config.time,
        )
    except BilevelError as err:
        raise BilevelError(f"bad budget: {err}") from None


def _evaluation(
    config: HpoConfig, budget: Budget, evaluator: LowerEvaluator
) -> tuple[Callable[[Any, int], dict[str, float]], int]:
    """(evaluate callback, steps between calls): ``--eval-every`` if given; else about 25
    evaluations for a step budget, a :class:`ThrottledEvaluation` offered every step for a
    time budget, and every 2 (10 for SID) steps for an oracle-call budget."""
    if config.eval_every is not None:
        return evaluator, int(config.eval_every)
    if budget.steps is not None and budget.oracle_calls is None and budget.wall_time is None:
        return evaluator, max(1, budget.steps // 25)
    if budget.wall_time is not None:
        return ThrottledEvaluation(evaluator, EVALUATION_SHARE), 1
    return evaluator, 10 if config.method == "sid" else 2


def _once(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` evaluated by rank 0 alone in a data-parallel run, its value broadcast to every
    process (:func:`bilevel.distributed.once`): the accurate evaluations (F(θ) by a full
    L-BFGS solve, the baseline's grid) are done once, not on every rank."""
    if distributed.current() is None:
        return fn
    return lambda *args, **kwargs: distributed.once(lambda: fn(*args, **kwargs))


def _with_bound_note(
    evaluate: Callable[[Any, int], dict[str, float]], method: str
) -> Callable[[Any, int], dict[str, Any]]:
    """``evaluate`` whose records also say why ``bound`` is empty (:func:`hpo_estimator`
    computes no ω: ISGD steps do not use it; ``distance`` is the certificate logged)."""
    reason = (
        "no stochastic error bound exists (SID)"
        if method == "sid"
        else "no a-posteriori bound exists for unrolling (ITD)"
        if method == "itd"
        else "not computed: ISGD steps do not use ω (compute_bound=False)"
    )

    def wrapped(theta: Any, step: int) -> dict[str, Any]:
        out = dict(evaluate(theta, step))
        if out:
            out["bound_note"] = reason + "; see distance for the certified lower-level accuracy"
        return out

    return wrapped


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise BilevelError(f"unknown device {text!r} (use cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BilevelError(f"device {text!r} requested but CUDA is not available")
    return device


#: Files a run writes besides those of its run loop (removed by ``--overwrite``).
JOB_FILES = (
    "job.json",
    "summary.json",
    "hyperparameters.csv",
    "hyperparameters_best.csv",
)


def _check_options(config: HpoConfig, resume: bool, overwrite: bool) -> None:
    """Refuse bad numeric options and run-directory choices before any data are read."""
    for name in ("inner_steps", "batch_size", "eval_every", "checkpoint_every"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise BilevelError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value}"
            )
    if config.cv is not None and config.cv < 2:
        raise BilevelError(f"--cv must be at least 2 folds, got {config.cv}")
    if config.cv is not None and config.method == "sid":
        raise BilevelError("--cv needs --method aid-cg or itd (SID samples one training set)")
    if resume:
        if config.run_dir is None:
            raise BilevelError("--resume needs --run-dir (the directory of the run to continue)")
        if overwrite:
            raise BilevelError("--resume and --overwrite exclude each other")
        if not (pathlib.Path(config.run_dir) / "job.json").is_file():
            raise BilevelError(
                f"--resume: no run to resume in {config.run_dir} (no job.json there)"
            )
    if config.run_dir is not None:
        path = pathlib.Path(config.run_dir)
        if path.exists() and not path.is_dir():
            raise BilevelError(f"--run-dir {config.run_dir} is a file, not a directory")


def run(
    config: HpoConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    json: bool = False,
    argv: list[str] | None = None,
    on_start: Callable[[pathlib.Path], None] | None = None,
) -> int:
    """Run ``bilevel hpo`` as ``config`` describes; returns the exit status (0 on success).

    ``resume`` continues the run in ``config.run_dir`` (its ``job.json`` must hold the same
    configuration, budgets and outputs aside), ``overwrite`` replaces one; ``json`` prints the
    summary as one JSON object; ``argv`` (the command-line arguments) makes the resume hint of
    an interrupted run; ``on_start(run_dir)`` is called once the run can be resumed. Every
    option is checked before any work; the run directory is locked while the run writes it."""
    if not isinstance(config, HpoConfig):
        raise BilevelError(f"bilevel hpo needs an HpoConfig, got {type(config).__name__}")
    inv = Invocation(resume, overwrite, json, argv)
    t_start = time.perf_counter()
    log = sys.stderr

    def say(message: str) -> None:
        if config.progress:
            print(message, file=log, flush=True)

    model_name = config.model or ("ridge" if config.data == "diabetes" else "logistic")
    if not (0 <= config.label_noise <= 1):
        raise BilevelError(f"--label-noise must be in [0, 1], got {config.label_noise}")
    theta_range = _parse_range(config.theta_range, model_name)
    shrinkage = _parse_shrinkage(config.shrinkage, model_name)
    init = _parse_init(config.init)
    step = as_schedule(config.step)
    budget = _budget(config)
    device = _device(config.device)
    _check_options(config, resume, overwrite)
    run_dir = (
        pathlib.Path(config.run_dir)
        if config.run_dir
        else _default_run_dir(config.data, config.method or "auto")
    )
    zero_based = {"auto": "auto", "zero": True, "one": False}[config.svmlight_indexing]
    read_info: dict[str, Any] = {}
    data = load_data(
        config.data,
        regression=model_name == "ridge",
        seed=config.seed,
        data_dir=config.data_dir,
        device=device,
        label_column=config.label_column,
        zero_based=zero_based,
        info=read_info,
    )
    say(f"bilevel hpo: {data!r}")
    method = config.method
    if method is None:  # the size rule: SID for large training sets
        method = default_method(data.n_train, config.cv)
        say(f"method: {method} ({data.n_train} training samples; {DEFAULT_METHOD_RULE})")
    if config.cv is not None and method == "sid":
        raise BilevelError("--cv needs --method aid-cg or itd (SID samples one training set)")
    data = data_for(data, method)  # the method's layout of the features, copied once
    indexing = config.svmlight_indexing
    if "zero_based" in read_info:
        base = "zero" if read_info["zero_based"] else "one"
        why = "--svmlight-indexing"
        if zero_based == "auto":
            why = "index 0 " + ("occurs" if read_info["zero_based"] else "does not occur")
        say(f"  svmlight feature indices read as {base}-based ({why})")
        indexing = base
    if config.batch_size is not None and method == "sid" and config.batch_size > data.n_train:
        raise BilevelError(
            f"--batch-size {config.batch_size} exceeds the {data.n_train} training samples"
        )
    if config.cv is not None and config.cv > data.n_train + int(data.X_val.shape[0]):
        raise BilevelError(f"--cv {config.cv}: more folds than rows")
    if shrinkage is None:  # with --cv every training and validation row validates once
        n_validation = int(data.X_val.shape[0]) + (data.n_train if config.cv is not None else 0)
        shrinkage = default_shrinkage(n_validation)
    if distributed.current() is not None:  # every process writes into rank 0's directory
        run_dir = pathlib.Path(distributed.current().broadcast_object(str(run_dir)))
    # the effective configuration: every choice left to the job made (job.json)
    config = dataclasses.replace(
        config,
        model=model_name,
        method=method,
        shrinkage=shrinkage,
        theta_range=f"{theta_range[0]!r},{theta_range[1]!r}",
        svmlight_indexing=indexing,
        device=str(device),
        run_dir=str(run_dir),
    )
    job = job_record(config)

    def prepare() -> None:
        present = [n for n in ("job.json", "config.json") if (run_dir / n).exists()]
        if resume:
            check_resume(run_dir / "job.json", job, ignore=resumable_fields(config))
        elif present and not overwrite:
            raise BilevelError(
                f"{run_dir} already holds a run ({', '.join(present)}): resume it (--resume), "
                "start again (--overwrite), or choose another directory"
            )
        elif overwrite:
            for name in JOB_FILES:
                (run_dir / name).unlink(missing_ok=True)
        write_json(run_dir / "job.json", job)

    # data parallel (bilevel.distributed): rank 0 alone writes the run's files
    with RunLock(run_dir) if distributed.is_writer() else contextlib.nullcontext():
        distributed.on_writer(prepare)
        if on_start is not None:
            on_start(run_dir)
        return _train(
            config,
            inv,
            data,
            job,
            theta_range,
            init,
            step,
            budget,
            run_dir,
            t_start,
            say,
        )


def _train(
    config: HpoConfig,
    inv: Invocation,
    data: SplitData,
    job: dict[str, Any],
    theta_range: tuple[float, float],
    init: float | None,
    step: Any,
    budget: Budget,
    run_dir: pathlib.Path,
    t_start: float,
    say: Callable[[str], None],
) -> int:
    """The work of ``bilevel hpo`` once its options are checked and its directory locked."""
    # baseline: one common value of θ, chosen on the validation set
    model = build_model(
        data,
        config.model,
        theta0=0.0,
        theta_range=theta_range,
        label_noise=config.label_noise,
        shrinkage=config.shrinkage,
        seed=config.seed,
        cv=config.cv,
    )
    store_for(model, config.method)  # a copy only of cross validation's stacked rows
    evaluator = LowerEvaluator(model, data.X_test, data.y_test)  # clean test labels
    evaluate, eval_every = _evaluation(config, budget, _once(evaluator))
    evaluate = _with_bound_note(evaluate, config.method)
    baseline = _once(single_strength_baseline)(model, evaluator, theta_range=theta_range)
    say(
        f"baseline (one common θ, {baseline['evaluated']} values of the grid): "
        f"θ = {baseline['theta']:g}, "
        f"val loss {baseline['val_loss']:.6g} ({baseline['seconds']:.1f} s)"
    )
    theta0 = baseline["theta"] if init is None else min(max(init, theta_range[0]), theta_range[1])
    with torch.no_grad():
        model.theta.fill_(theta0)
    initial = _once(evaluator.metrics)()
    if distributed.current() is not None:  # rank 0's accurate w(θ₀) starts every process
        evaluator.w = distributed.current().broadcast_object(evaluator.w)

    method = hpo_method(
        model,
        config.method,
        step=step,
        seed=config.seed,
        theta_range=theta_range,
        inner_steps=config.inner_steps,
        batch_size=config.batch_size,
        sid_solver=config.sid_solver,
    )
    estimator_state = method.estimator.init_state()  # SID: watched by the rise guard
    evaluate = guard_sid(evaluate, estimator_state, evaluator, initial)
    result: RunResult = method.run(
        model.problem,
        lower_instances(model, evaluator.w),
        budget,
        run_dir=run_dir,
        resume=inv.resume,
        overwrite=inv.overwrite,
        evaluate=ranked_by(evaluate, "val_loss", "min"),
        eval_every=eval_every,
        checkpoint_every=config.checkpoint_every,
        progress=config.progress,
        plot=config.plots,
        estimator_state=estimator_state,
    )
    if not distributed.is_writer():
        return 0 if result.ok else 130 if not result.finished else 1
    if not result.finished:
        hint = resume_command("hpo", inv.argv or [], str(run_dir))
        partial = {
            **job,
            "status": result.status,
            "finished": False,
            "message": result.message,
            "steps": result.step,
            "run_dir": str(run_dir),
            "resume": hint,
        }
        write_json(run_dir / "summary.json", partial)
        if inv.json:
            print(dumps_json(partial))
        print(
            f"bilevel hpo: {result.message.split(';')[0]}; not finished; resume with: {hint}",
            file=sys.stderr,
        )
        return 130
    final = dict(result.evaluation) if result.evaluation else evaluator.metrics()
    write_hyperparameters(run_dir / HYPERPARAMETERS_FILE, model, data)
    best = _best_summary(result)
    if result.best_theta is not None:
        last = model.theta.detach().clone()
        with torch.no_grad():
            model.theta.copy_(result.best_theta[0])
        write_hyperparameters(run_dir / BEST_HYPERPARAMETERS_FILE, model, data)
        with torch.no_grad():
            model.theta.copy_(last)
    if config.plots:
        plot_hyperparameters(run_dir / "plots" / "hyperparameters.png", model, data, theta0)
    summary = _summary(data, model, job, initial, final, baseline, result, t_start)
    summary["best"] = best
    write_json(run_dir / "summary.json", summary)
    if config.plots:
        write_report(run_dir, config, to_jsonable(summary))
    if inv.json:
        print(dumps_json(summary))
    else:
        _print_summary(summary)
    gap = summary["lower_gap"]
    if config.method in _TRACKING_ADVICE and gap is not None and gap["relative"] > TRACKING_WARNING:
        if config.method == "sid" and config.inner_steps is None and not sid_capped(result.records):
            cause = (
                "SID met its inner tolerances ‖∇_w h‖ ≤ ε_k at every step, and with this "
                "problem's small strong convexity μ the lower iterate may lie up to ε_k/μ from "
                "w(θ); the gap closes as ε_k decreases."
            )
        else:
            cause = (
                "its lower-level iterations per step do not keep up with θ, so the "
                f"hypergradients were taken far from w(θ). {_TRACKING_ADVICE[config.method]}"
            )
        print(
            f"warning: at step {gap['step']} the upper loss at {config.method}'s lower iterate "
            f"and at w(θ) differ by {100 * gap['relative']:.0f} %: {cause}",
            file=sys.stderr,
        )
    return 0 if result.ok else 1


def _best_summary(result: RunResult) -> dict[str, Any] | None:
    """The run's best evaluation (lowest validation loss): its step and metrics, and the file
    with its θ; None when nothing was evaluated."""
    if result.best is None:
        return None
    step = result.best["step"]
    metrics: dict[str, Any] = {}
    if result.evaluation is not None and step == result.step:
        metrics = dict(result.evaluation)
    else:
        for r in result.records:
            if r.get("step") == step and "val_loss" in r:
                keys = ("val_loss", "test_accuracy", "test_mse", "test_r2", "shrinkage_penalty")
                metrics = {k: r[k] for k in keys if k in r}
                break
    return {
        "step": step,
        "val_loss": result.best["value"],
        **metrics,
        "hyperparameters": BEST_HYPERPARAMETERS_FILE,
    }


#: Relative gap |f(w_k) − F(θ_k)| / F(θ_k) above which ``bilevel hpo`` warns that the method's
#: lower iterate w_k does not follow w(θ).
TRACKING_WARNING = 0.1
#: What to do when a method's lower iterate lags behind w(θ) (aid-cg solves to a tolerance, so
#: its gap follows the accuracy schedule; SID does too unless its iteration caps are reached or
#: --inner-steps fixes t and k).
_TRACKING_ADVICE = {
    "sid": "SID's inner iterations stopped at their cap (or at the fixed --inner-steps) before "
    "the lower level met its tolerance: drop --inner-steps (adaptive t and k), raise "
    "--batch-size, or use --method aid-cg (L-BFGS and CG need about √(L/μ) iterations) on "
    "small, ill-conditioned sets.",
    "itd": "Raise --inner-steps, or use --method aid-cg.",
}


def sid_capped(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some SID step stopped at its iteration cap with an estimated residual above its
    target (records with ``sid_lower_residual`` / ``sid_lower_target`` and the adjoint's)."""
    for r in records:
        for stage in ("lower", "adjoint"):
            res, target = r.get(f"sid_{stage}_residual"), r.get(f"sid_{stage}_target")
            if res is not None and target is not None and res > target:
                return True
    return False


def lower_level_gap(records: list[Mapping[str, Any]]) -> dict[str, float] | None:
    """How far the method's lower iterate w_k is from w(θ_k), measured in the upper loss at
    the last evaluated step k: f(w_k) (the method's upper loss less the shrinkage penalty)
    against F(θ_k) = f(w(θ_k)) from the evaluator's accurate solve. None when no step was
    evaluated."""
    for r in reversed(records):
        if "val_loss" in r and r.get("upper_loss") is not None:
            f_iterate = float(r["upper_loss"]) - float(r.get("shrinkage_penalty", 0.0))
            val = float(r["val_loss"])
            return {
                "step": int(r["step"]),
                "f_iterate": f_iterate,
                "val_loss": val,
                "relative": abs(f_iterate - val) / max(abs(val), 1e-300),
            }
    return None


def _summary(
    data: SplitData,
    model: FiniteSumModel,
    job: Mapping[str, Any],
    initial: Mapping[str, float],
    final: Mapping[str, float],
    baseline: Mapping[str, Any],
    result: RunResult,
    t_start: float,
) -> dict[str, Any]:
    theta = model.theta.detach().to("cpu", torch.float64)
    if isinstance(model, HypercleaningModel):
        values = {"weight_min": float(torch.sigmoid(theta).min())}
        values["weight_max"] = float(torch.sigmoid(theta).max())
        if model.corrupted is not None and 0 < int(model.corrupted.sum()) < model.n_train:
            values["detection"] = model.detection()
    else:
        values = {
            "strength_min": float(theta.exp().min()),
            "strength_max": float(theta.exp().max()),
        }
    return {
        **job,
        "n_train": data.n_train,
        "n_val": int(data.X_val.shape[0]),
        "n_test": int(data.X_test.shape[0]),
        "n_features": data.n_features,
        "n_classes": data.n_classes,
        "n_hyperparameters": int(model.theta.numel()),
        "initial": dict(initial),
        "final": dict(final),
        "baseline": dict(baseline),
        "theta": {
            "mean": float(theta.mean()),
            "min": float(theta.min()),
            "max": float(theta.max()),
            **values,
        },
        "status": result.status,
        "finished": result.finished,
        "message": result.message,
        "steps": result.step,
        "cost": float(result.cost),
        # computation over every session of the run, evaluations excluded (as result.json)
        "wall_time": float(result.wall_time),
        "total_time": time.perf_counter() - t_start,
        "run_dir": str(result.run_dir),
        "lower_gap": lower_level_gap(result.records),
    }


def _print_summary(s: Mapping[str, Any]) -> None:
    metric = "test_accuracy" if "test_accuracy" in s["final"] else "test_mse"

    def row(name: str, m: Mapping[str, Any]) -> str:
        return f"  {name:<28} val loss {m['val_loss']:<12.6g} {metric} {m[metric]:.4f}"

    b = s["baseline"]
    shrinkage = f", shrinkage ρ = {s['shrinkage']:.3g}" if s.get("shrinkage") else ""
    rows = f"{s['n_train']} training samples"
    if s.get("cv"):
        rows = f"{s['cv']}-fold cross validation over {s['n_train'] + s['n_val']} rows"
    print(
        f"bilevel hpo: {s['model']} on {s['data']} with {s['method']} "
        f"({s['n_hyperparameters']} hyperparameters, {rows}{shrinkage})"
    )
    print(row("initial θ", s["initial"]))
    print(row("learnt θ", s["final"]))
    print(row(f"best common θ = {b['theta']:g}", b))
    print(
        f"  {s['status']}: {s['message']}; {s['steps']} steps, {s['cost']:.4g} oracle calls, "
        f"{s['wall_time']:.2f} s of computation ({s['total_time']:.1f} s in all)"
    )
    detection = s["theta"].get("detection")
    if detection is not None:
        print(
            f"  sample weights: clean {detection['weight_clean_mean']:.3f}, corrupted "
            f"{detection['weight_corrupted_mean']:.3f} on average "
            f"({detection['n_corrupted']} corrupted); AUC {detection['auc']:.3f} "
            "(probability that a clean sample outweighs a corrupted one)"
        )
    gap = s.get("lower_gap")
    if gap is not None:
        print(
            f"  lower iterate at step {gap['step']}: f = {gap['f_iterate']:.6g}, "
            f"F(θ) = {gap['val_loss']:.6g} at w(θ) ({100 * gap['relative']:.1f} % apart)"
        )
    print(f"  run directory: {s['run_dir']} (learnt values: {HYPERPARAMETERS_FILE})")
