"""Train a ridge regulariser (CRR-NN or WCRR-NN style) on BSDS300 patches by Adam-ISGD.

    python benchmarks/train_regulariser.py --model crr --sigma 25 --run-dir runs/crr25 \
        [--patches 2000 --patch 48 --budget 2000000 --device cuda] [--resume] \
        [--export NAME] [--init-model NAME]

Data: random ``--patch``-pixel patches of the grayscale images in ``DATA/train`` (the 200
BSDS300 training images), noise frozen per patch (seeded); the images are split by file
(``--val-images`` of them held out) into training patches and validation patches. Upper level:
Adam-ISGD (the library's ``ISGD(optimizer="adam")``) with implicit hypergradients (warm-started
lower solves, Nesterov unless ``--lower-solver``; CG adjoints), step α_k = α₀/(k+1)^p times a
factor per parameter group (``--group-steps``), checkpoints in the run directory (``--resume``
continues the run; ``--time`` limits its wall time, evaluations excluded, over all resumes).
The validation PSNR is logged every ``--eval-every`` steps together with each parameter group's
distance from its initial value (so that a group that does not move is seen); the run keeps the
θ with the best validation PSNR. ``--export NAME`` (also with ``--resume`` of a finished run)
writes that model with its configuration, data, seed, the command that started the run (and its
resumes) and validation PSNR to the package's pretrained-model folder
(``bilevel.imaging.pretrained``); test scores are added by ``benchmarks/imaging_quality.py
--record NAME``. ``--init-model NAME`` starts θ₀ at the shipped model NAME (same class and
architecture as the options ask for) instead of at tuned TV, to continue its training with the
same data and options; its record is kept in the run directory (``init_model.json``) and the
exported record lists the chain of commands that made the model (``training.chain``).

σ-aware models: ``--noise-nodes 15,25,50`` builds the model with scalings α(σ), β(σ) that are
linear splines in log σ with values at these nodes (``ConvexRidgeNetwork(noise_nodes=...)``);
an ``--init-model`` with log-linear scalings is converted without change at the nodes.
``--train-only log_strength,log_sharpness`` learns only the parameters whose names start with
these prefixes (the others stay frozen): trained at ``--sigma`` = a node, only that node's
α and β move, so a chain of such runs (one per σ, each ``--init-model`` the previous export)
fits one model to several noise levels without changing it at the others:

    python benchmarks/train_regulariser.py --sigma 15 --noise-nodes 15,25,50 \
        --init-model crr16-sigma25 --train-only log_strength,log_sharpness ... \
        --export crr16-sigma-aware
    python benchmarks/train_regulariser.py --sigma 50 --noise-nodes 15,25,50 \
        --init-model crr16-sigma-aware --train-only log_strength,log_sharpness ... \
        --export crr16-sigma-aware
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from bilevel import CG, ISGD, LBFGS, Budget, Implicit, Nesterov
from bilevel.imaging import (
    ConvexRidgeNetwork,
    DegradedImages,
    SmoothedTV,
    WeaklyConvexRidge,
    grid_search_tv,
    load_image_folder,
    psnr,
    random_crops,
    reconstruct,
    reconstruction_problem,
    regularisers,
    ridge_layers,
)
from bilevel.imaging.job import calibrate_ridge_strength
from bilevel.imaging.preconditioner import RidgePreconditioning
from bilevel.imaging.pretrained_models import reference_check, save_pretrained
from bilevel.methods import ranked_by, with_initial
from bilevel.methods.optim import load_params

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"
TV_GRID = (0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3)
#: Training patches (the first ones; they are random) on which TV's strength is tuned.
TV_TUNE = 256
#: Step factors per parameter group: the filters' entries (layers.*) are O(1/size) numbers
#: whose Adam steps of α_k each would change the composite filters by O(α_k · size) per step,
#: so they take a smaller factor; the log-parametrised potentials and scalings move by α_k.
GROUP_STEPS = "layers=0.05"


def group_factors(spec: str) -> list[tuple[str, float]]:
    """``"layers=0.05,log_slopes=1"`` → [("layers", 0.05), ("log_slopes", 1.0)]."""
    out = []
    for item in (s for s in spec.split(",") if s.strip()):
        prefix, _, factor = item.partition("=")
        try:
            out.append((prefix.strip(), float(factor)))
        except ValueError:
            sys.exit(f"train_regulariser: --group-steps wants PREFIX=FACTOR, got {item!r}")
    return out


class GroupScaledAdam(torch.optim.Adam):
    """Adam whose parameter groups take ``factor`` × the learning rate the method sets."""

    def step(self, closure=None):  # type: ignore[override]
        rates = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g["factor"]
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, rates):
                g["lr"] = lr


def adam_factory(model: torch.nn.Module, spec: str):
    """``factory(params)`` for ISGD: one Adam group per parameter with its step factor."""
    names = {id(p): n for n, p in model.named_parameters()}
    factors = group_factors(spec)

    def factor(name: str) -> float:
        return next((f for prefix, f in factors if name.startswith(prefix)), 1.0)

    def make(params):
        groups = [{"params": [p], "factor": factor(names.get(id(p), ""))} for p in params]
        return GroupScaledAdam(groups, lr=1e-3)

    return make


#: ``--lower-solver``: warm-started lower-level solvers of the implicit hypergradients
LOWER_SOLVERS = {
    "nesterov": Nesterov(max_iter=5000),
    "lbfgs": LBFGS(max_iter=2000),
    "lbfgs-fourier": LBFGS(max_iter=2000, preconditioner=RidgePreconditioning()),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", choices=("crr", "wcrr"), default="crr")
    a("--data", default=str(DEFAULT_DATA), help="folder with train/ (default: BSDS300)")
    a("--sigma", type=float, default=25.0, help="noise σ on the 0-255 scale (default: 25)")
    a("--filters", type=int, default=16)
    a("--filter-size", type=int, default=13, help="composite filter support (default: 13)")
    a("--max-weak-convexity", type=float, default=0.5, help="wcrr: ρ_max (default: 0.5)")
    a("--patch", type=int, default=48, help="patch size in pixels (default: 48)")
    a("--patches", type=int, default=512, help="training patches (default: 512)")
    a("--val-patches", type=int, default=64, help="validation patches (default: 64)")
    a("--val-images", type=int, default=20, help="training images held out for validation")
    a("--images", type=int, default=None, help="use only the first N training images")
    a("--batch-size", type=int, default=16)
    a("--step", type=float, default=2e-2, help="Adam step α₀ (default: 2e-2)")
    a("--power", type=float, default=0.25, help="α_k = α₀/(k+1)^power (default: 0.25)")
    a(
        "--group-steps",
        default=GROUP_STEPS,
        help="per parameter group factors of α_k, PREFIX=FACTOR,... matched against the "
        f"parameter names (first match; others 1) (default: {GROUP_STEPS})",
    )
    a("--accuracy", default="poly:1e-1,0.5", help="ε_k = δ_k schedule (default: poly:1e-1,0.5)")
    a("--budget", type=int, default=200_000, help="oracle calls (default: 200000)")
    a(
        "--lower-solver",
        choices=tuple(LOWER_SOLVERS),
        default="nesterov",
        help="lower-level solver: nesterov (the shipped models' runs), lbfgs, or lbfgs-fourier "
        "(L-BFGS preconditioned by each solve's Fourier model, RidgePreconditioning) "
        "(default: nesterov)",
    )
    a("--steps", type=int, default=None, help="upper-level steps at most")
    a("--time", type=float, default=None, help="wall-time budget in seconds")
    a("--eval-every", type=int, default=20)
    a("--device", default="cpu", help="cpu or cuda (default: cpu)")
    a("--dtype", choices=("float32", "float64"), default="float32")
    a("--threads", type=int, default=1)
    a("--seed", type=int, default=0)
    a("--run-dir", required=True, help="run directory (with --from-run: a finished run)")
    a(
        "--from-run",
        action="store_true",
        help="export the crr/wcrr model of the finished `bilevel denoise` run in --run-dir "
        "(job.json, model.pt, summary.json) instead of training",
    )
    a("--resume", action="store_true")
    a("--export", default=None, help="write the trained model as pretrained model NAME")
    a(
        "--noise-nodes",
        default=None,
        help="σ-aware scalings: linear splines in log σ with values at these σ (0-255 scale, "
        "comma-separated, e.g. 15,25,50)",
    )
    a(
        "--train-only",
        default=None,
        help="learn only the parameters whose names start with these comma-separated prefixes "
        "(e.g. log_strength,log_sharpness); the others stay frozen",
    )
    a(
        "--init-model",
        default=None,
        help="start from the weights of the shipped model NAME (to continue its training)",
    )
    return p.parse_args(argv)


def data_sets(args: argparse.Namespace, dtype: torch.dtype) -> tuple[DegradedImages, ...]:
    """(train, validation) patches with frozen noise; validation from held-out images."""
    folder = Path(args.data) / "train"
    if not folder.is_dir():
        sys.exit(f"train_regulariser: no folder {folder}")
    images = load_image_folder(folder, color=False, dtype=dtype)
    if args.images is not None:
        images = images[: args.images]
    if len(images) <= args.val_images:
        sys.exit("train_regulariser: need more training images than --val-images")
    train_imgs, val_imgs = images[: -args.val_images], images[-args.val_images :]
    sigma = args.sigma / 255.0
    train = random_crops(train_imgs, args.patch, args.patches, generator=args.seed)
    val = random_crops(val_imgs, args.patch, args.val_patches, generator=args.seed + 1)
    return (
        DegradedImages(train, sigma=sigma, seed=args.seed + 2).to(args.device),
        DegradedImages(val, sigma=sigma, seed=args.seed + 3).to(args.device),
    )


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The regulariser and the keyword arguments that rebuild it."""
    layers, kernel = ridge_layers(args.filter_size)
    kwargs = {"num_filters": args.filters, "channels": 1, "layers": layers}
    kwargs.update(kernel_size=kernel, noise_level=args.sigma / 255.0)
    if args.noise_nodes:
        kwargs["noise_nodes"] = [float(s) for s in args.noise_nodes.split(",") if s]
    if args.model == "wcrr":
        kwargs["max_weak_convexity"] = args.max_weak_convexity
        return WeaklyConvexRidge(**kwargs), kwargs
    return ConvexRidgeNetwork(**kwargs), kwargs


def portable(info: dict, run_dir: Path) -> dict:
    """``info`` with this machine's paths written as placeholders: the run directory as
    ``RUN_DIR`` and the default data folder relative to the checkout (``../shared/...``)."""
    text = json.dumps(info, ensure_ascii=False)
    for path, name in ((run_dir.resolve(), "RUN_DIR"), (run_dir, "RUN_DIR")):
        text = text.replace(json.dumps(str(path))[1:-1], name)
    text = text.replace(json.dumps(str(DEFAULT_DATA))[1:-1], "../shared/data/bsds300")
    return json.loads(text)


def export_run(run_dir: Path, name: str) -> Path:
    """Ship the (weakly) convex ridge network of a finished ``bilevel denoise`` run."""
    from bilevel.config import job_record, resumable_fields
    from bilevel.imaging.apply import load_learned

    model, config = load_learned(run_dir)
    options = job_record(config)
    if options["regulariser"] not in ("crr", "wcrr") or options["job"] != "denoise":
        sys.exit("train_regulariser: --from-run needs a bilevel denoise run of crr or wcrr")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    layers, kernel = ridge_layers(options["filter_size"])
    kwargs = {"num_filters": options["filters"], "channels": 1, "layers": layers}
    kwargs.update(kernel_size=kernel, noise_level=options["sigma"] / 255.0)
    if options["regulariser"] == "wcrr":
        kwargs["max_weak_convexity"] = model.max_weak_convexity
    skip = ("job", "color", "dtype", *resumable_fields(config))
    flags = {k: v for k, v in options.items() if k not in skip and v is not None}
    info = {
        "class": type(model).__name__,
        "kwargs": kwargs,
        "sigma": options["sigma"],
        "description": f"{options['regulariser']} with {options['filters']} filters of "
        f"{options['filter_size']}×{options['filter_size']}, grayscale, "
        f"σ = {options['sigma']:g}/255",
        "training": {
            "command": "bilevel denoise "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()),
            "config": options,
            "data": f"{options['train_size']} random {options['crop']}px crops of the "
            f"{options['data']} training images, noise frozen per crop",
            "seed": options["seed"],
            "summary": summary,
        },
        "check": reference_check(model, options["sigma"]),
    }
    return save_pretrained(model, name, portable(info, run_dir))


def init_from_model(
    model: torch.nn.Module, kwargs: dict, name: str, run_dir: Path, resume: bool
) -> dict:
    """Load the shipped model ``name`` into ``model`` (its class and ``kwargs`` must be the
    ones the options build, up to the noise level, and up to noise nodes that a model with
    log-linear scalings is converted to) and return its record; a fresh run stores the record
    and the (converted) weights as ``run_dir/init_model.json`` and ``init_model.pt`` (a resumed
    run reads them from there, so that θ₀ and the chain stay those it started from even if the
    shipped model was replaced since; its checkpoint then replaces θ)."""
    from bilevel.imaging.pretrained_models import MODEL_DIR, model_info

    path, weights = run_dir / "init_model.json", run_dir / "init_model.pt"
    if resume and path.is_file() and weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return json.loads(path.read_text(encoding="utf-8"))
    info = model_info(name)
    skip = ("noise_level", "noise_nodes")
    nodes, shipped_nodes = kwargs.get("noise_nodes"), info["kwargs"].get("noise_nodes")
    same = {k: v for k, v in info["kwargs"].items() if k not in skip} == {
        k: v for k, v in kwargs.items() if k not in skip
    }
    if info["class"] != type(model).__name__ or not same or shipped_nodes not in (None, nodes):
        sys.exit(
            f"train_regulariser: --init-model {name} is a {info['class']} with {info['kwargs']}; "
            f"the options build a {type(model).__name__} with {kwargs}"
        )
    source = getattr(regularisers, info["class"])(**info["kwargs"])
    weights_file = MODEL_DIR / f"{name}.pt"
    source.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    if nodes is not None and shipped_nodes is None:
        source.with_noise_nodes(nodes)
    if not math.isclose(float(source.noise_level), kwargs["noise_level"], rel_tol=1e-6):
        source.set_noise_level(kwargs["noise_level"])  # trained at another σ: this run's σ
    state = source.state_dict()
    model.load_state_dict(state)
    record = {"name": name, **info}
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, weights)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return record


def train_only(model: torch.nn.Module, spec: str) -> list[str]:
    """Freeze every parameter whose name starts with none of the comma-separated prefixes of
    ``spec``; returns the names of those left to learn."""
    prefixes = tuple(s.strip() for s in spec.split(",") if s.strip())
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(prefixes))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        sys.exit(f"train_regulariser: --train-only {spec} matches no parameter")
    return names


def command_chain(init: dict | None, commands: list[str]) -> list[str]:
    """The commands that make the model, in order: those of the model it started from
    (``init``'s record: its ``chain``, or its ``command`` and ``resumed_with``), then
    ``commands``. Each run has its own directory: the earlier runs' placeholder ``RUN_DIR``
    becomes ``RUN_DIR_1``, ``RUN_DIR_2``, ... in the order of the runs."""
    if init is None:
        return list(commands)
    training = init.get("training", {})
    earlier = training.get("chain") or [
        training["command"],
        *(f"python benchmarks/train_regulariser.py {c}" for c in training.get("resumed_with", [])),
    ]
    stage = 1 + len(set(re.findall(r"RUN_DIR_\d+", " ".join(earlier))))
    bare = re.compile(r"(?<![\w-])RUN_DIR(?![\w-])")
    return [*(bare.sub(f"RUN_DIR_{stage}", c) for c in earlier), *commands]


def record_command(run_dir: Path, argv: list[str], resume: bool) -> list[list[str]]:
    """Append ``argv`` to the run's ``commands.json`` (a fresh run starts it); returns all of
    them, the command that started the run first."""
    path = run_dir / "commands.json"
    commands = json.loads(path.read_text()) if resume and path.is_file() else []
    commands.append(list(argv))
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(commands, indent=1) + "\n")
    return commands


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_run:
        if not args.export:
            sys.exit("train_regulariser: --from-run needs --export NAME")
        print(f"exported to {export_run(Path(args.run_dir), args.export)}")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("train_regulariser: --device cuda but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    train, val = data_sets(args, dtype)
    model, kwargs = build_model(args)
    model = model.to(args.device, dtype)
    run_dir = Path(args.run_dir)
    commands = record_command(run_dir, argv if argv is not None else sys.argv[1:], args.resume)
    start = time.perf_counter()
    # Start at smoothed isotropic TV of the strength tuned on (the first) training patches.
    tv = grid_search_tv(
        train.batch(torch.arange(min(TV_TUNE, len(train)))), TV_GRID, max_iter=1000, tol=1e-3
    )
    calibrate_ridge_strength(model, tv.strength)  # θ₀ (a resumed run then loads its θ)
    print(f"TV tuned on the training patches: λ = {tv.strength:g}, {tv.psnr:.2f} dB", flush=True)
    init = None
    if args.init_model:
        init = init_from_model(model, kwargs, args.init_model, run_dir, args.resume)
        print(f"θ₀: the weights of {args.init_model}", flush=True)
    if args.train_only:
        train_only(model, args.train_only)
    problem = reconstruction_problem(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    val_batch = val.batch()
    state: dict = {}

    def evaluate(theta, step: int) -> dict[str, float]:
        x = reconstruct(problem, val_batch, x0=state.get("x"), tol=3e-3, max_iter=3000)
        state["x"] = x
        out = {"val_psnr": float(psnr(x.clamp(0, 1), val_batch[1]).mean())}
        for n, p in model.named_parameters():  # each group's progress
            out[f"moved_{n}"] = float((p.detach() - initial[n]).norm() / (initial[n].norm() + 1))
        return out

    method = ISGD(
        step=f"poly:{args.step},{args.power}",
        accuracy=args.accuracy,
        batch_size=min(args.batch_size, len(train)),
        optimizer=adam_factory(model, args.group_steps),
        estimator=Implicit(
            CG(max_iter=500), lower_solver=LOWER_SOLVERS[args.lower_solver], compute_bound=False
        ),
        seed=args.seed,
    )
    budget = Budget(oracle_calls=args.budget, steps=args.steps, wall_time=args.time)
    result = method.run(
        problem,
        with_initial(train, lambda b: b[0].clone()),
        budget,
        run_dir=run_dir,
        resume=args.resume,
        evaluate=ranked_by(evaluate, "val_psnr", "max"),
        eval_every=args.eval_every,
        progress=False,
    )
    if result.best_theta is not None:  # the θ with the best validation PSNR
        load_params(problem.params, list(result.best_theta))
    final = evaluate(problem.theta, result.step)
    tv_problem = reconstruction_problem(SmoothedTV(tv.strength).to(args.device, dtype))
    x_tv = reconstruct(tv_problem, val_batch, tol=3e-3)
    summary = {
        "model": args.model,
        "steps": result.step,
        "oracle_calls": result.cost,
        "status": result.status,
        "wall_time_s": round(result.wall_time, 1),
        "process_time_s": round(time.perf_counter() - start, 1),
        "exported_step": (result.best or {}).get("step", result.step),
        "tv_strength": tv.strength,
        "val_psnr": {
            "noisy": float(psnr(val_batch[0].clamp(0, 1), val_batch[1]).mean()),
            "tv": float(psnr(x_tv.clamp(0, 1), val_batch[1]).mean()),
            "learned": final["val_psnr"],
        },
        "moved": {k[6:]: v for k, v in final.items() if k.startswith("moved_")},
    }
    if init is not None:
        summary["moved_from"] = args.init_model
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(model.state_dict(), run_dir / "model.pt")
    print(json.dumps(summary, indent=2))
    if args.export:
        config = {k: v for k, v in vars(args).items() if k not in ("export", "resume")}
        info = {
            "class": type(model).__name__,
            "kwargs": kwargs,
            "sigma": args.sigma,
            "description": f"{args.model} with {args.filters} filters of "
            f"{args.filter_size}×{args.filter_size}, "
            + (f"ρ_max = {args.max_weak_convexity:g}, " if args.model == "wcrr" else "")
            + f"grayscale, σ = {args.sigma:g}/255"
            + (
                f" (σ-aware: scalings fitted at σ = {args.noise_nodes.replace(',', ', ')})"
                if args.noise_nodes
                else ""
            ),
            "training": {
                "command": "python benchmarks/train_regulariser.py " + " ".join(commands[0]),
                "resumed_with": [" ".join(c) for c in commands[1:]],
                "chain": command_chain(
                    init,
                    ["python benchmarks/train_regulariser.py " + " ".join(c) for c in commands],
                ),
                "config": config,
                "data": f"{args.patches} random {args.patch}px patches of the BSDS300 training "
                f"images (last {args.val_images} held out for {args.val_patches} validation "
                "patches), grayscale, noise frozen per patch",
                "seed": args.seed,
                "summary": summary,
            },
        }
        if init is not None:
            info["training"]["initialised_from"] = {
                "name": init["name"],
                "training": init.get("training"),
                "test": init.get("test"),
            }
        info["check"] = reference_check(model.cpu().float(), args.sigma)
        print(f"exported to {save_pretrained(model, args.export, portable(info, run_dir))}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
