"""Denoising quality on the BSDS300 test images: noisy, tuned TV, BM3D and learned models.

    python benchmarks/imaging_quality.py [--images 100] [--sigmas 15,25,50] \
        [--models NAME,...] [--model-sigmas 25] [--no-bm3d] [--cache FILE] [--record NAME]

For each of the (first ``--images``, sorted by file name) grayscale test images of
``DATA/test`` at full size and each noise level σ (0-255 scale), the noisy image is
y = x + σ/255·ε with ε drawn in float32 from ``torch.Generator().manual_seed(s)``,
s = ``--seed`` + 1000·σ + i for the i-th image (seeds recorded in the JSON). Methods:

* noisy: y itself;
* TV: smoothed TV (ν = 0.01) whose strength λ is the best of a grid by mean PSNR on
  ``--tune-crops`` random crops of the *training* images (same noise model, other seeds);
* BM3D: ``bm3d.bm3d(y, sigma_psd=σ/255)`` of the optional ``bm3d`` package
  (``pip install bilevel[benchmarks]``);
* each learned model of ``--models`` (shipped pretrained names, see ``bilevel models``;
  σ-aware models are set to the σ evaluated), at the σ of ``--model-sigmas`` or, for
  ``NAME@15+50``, at those σ.

Reconstructions solve the lower level to a root-mean-square gradient of ``--tol`` (float32,
stopped earlier when the float32 rounding floor is reached). PSNR and SSIM (clipped to [0, 1])
per image and their means go to ``--json`` (default
``docs/benchmarks_imaging_quality_results.json``); ``--markdown`` writes the report with the
table and a figure. ``--cache FILE`` keeps every
per-image score (and each tuned TV strength) under a key that names all it depends on (a
ridge network: the digest of its energy at σ, see :func:`model_key`), so a rerun computes
only what is missing and processes that evaluate different models can share the file.
``--reuse RESULTS`` takes the per-image scores of an earlier results JSON under the same keys
(each σ's entry records the key of every method; for files written before the keys were
recorded, those of noisy, TV and BM3D are rebuilt from its configuration).
``--record NAME`` stores the model's mean test scores at its own σ in its pretrained record
(a σ-aware model's at every σ evaluated).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from bilevel.imaging import (
    SmoothedTV,
    grid_search_tv,
    load_image_folder,
    pretrained,
    psnr,
    random_crops,
    reconstruct,
    reconstruction_problem,
    ssim,
)
from bilevel.imaging.pretrained_models import MODEL_DIR, model_info
from bilevel.imaging.ridge import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "bsds300"
TV_GRID = (0.02, 0.035, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--data", default=str(DEFAULT_DATA), help="folder with train/ and test/ (BSDS300)")
    a("--images", type=int, default=100, help="first N test images (default: 100)")
    a("--sigmas", default="15,25,50", help="noise levels, 0-255 scale (default: 15,25,50)")
    a(
        "--models",
        default="",
        help="comma-separated pretrained model names, each optionally with the σ at which it "
        "is evaluated: NAME@15+25+50 (default: --model-sigmas)",
    )
    a(
        "--model-sigmas",
        default=None,
        help="the noise levels (of --sigmas) at which the models are evaluated (default: all)",
    )
    a("--no-bm3d", action="store_true", help="skip BM3D")
    a("--tune-crops", type=int, default=32, help="training crops that tune TV (default: 32)")
    a("--tune-crop-size", type=int, default=96)
    a("--tol", type=float, default=1e-4, help="RMS gradient tolerance (default: 1e-4)")
    a("--max-iter", type=int, default=3000)
    a("--seed", type=int, default=0)
    a(
        "--cache",
        default=None,
        help="JSON-lines file of scores already computed (read, and appended to): reruns "
        "add only what is missing, and several processes may share it",
    )
    a(
        "--reuse",
        default=None,
        help="an earlier results JSON whose per-image scores count as computed where their "
        "keys match (noisy, TV, BM3D, and the models whose keys it records)",
    )
    a("--threads", type=int, default=1)
    a("--device", default="cpu")
    a("--json", default=str(ROOT / "docs" / "benchmarks_imaging_quality_results.json"))
    a("--markdown", default=None, help="write the report here (with a figure beside it)")
    a("--record", default=None, help="store the test scores in pretrained model NAME's record")
    a(
        "--report-only",
        action="store_true",
        help="evaluate nothing: write --markdown / --record from the results in --json",
    )
    return p.parse_args(argv)


class Cache:
    """Scores and tuned strengths already computed, one JSON object per line
    ``{"key": ..., "value": ...}`` (the last line of a key wins). A key names everything the
    value depends on (σ, image, noise seed, method and its settings; a shipped model by the
    key of :func:`model_key`), so a stale entry is never reused. Lines are appended whole, so
    processes evaluating different methods can share one file: a key not found is looked up
    again in the lines that other processes appended since the file was last read."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, object] = {}
        self.offset = 0  # bytes of the file read so far (complete lines only)
        self.refresh()

    def refresh(self) -> None:
        """Read the complete lines appended to the file since the last read."""
        if self.path is None or not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        for line in data[:end].decode("utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                self.entries[entry["key"]] = entry["value"]
        self.offset += end

    def get(self, key: str):
        if key not in self.entries:
            self.refresh()
        return self.entries.get(key)

    def reuse(self, path: str) -> int:
        """Take the per-image scores of the results JSON at ``path`` (see :func:`evaluate`)
        under their keys, in memory; returns how many were taken. Keys already known win."""
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        cfg = result["config"]
        solver = f"tol={cfg['tol']:g} max-iter={cfg['max_iter']}"
        taken = 0
        for sigma, r in result["results"].items():
            tuned = tune_key(float(sigma), cfg["tune_crops"], cfg["tune_crop_size"], cfg["seed"])
            self.entries.setdefault(tuned, r["tv_strength"])
            keys = r.get("keys") or {
                "noisy": "noisy",
                "TV": tv_key(SmoothedTV(strength=r["tv_strength"]), solver),
                "BM3D": "BM3D",
            }
            for name, key in keys.items():
                m = r["methods"].get(name)
                if m is None:
                    continue
                for image, seed, *value in zip(
                    result["images"], r["noise_seeds"], m["psnr"], m["ssim"]
                ):
                    full = f"σ={float(sigma):g} image={image} noise-seed={seed} {key}"
                    if full not in self.entries:
                        self.entries[full] = value
                        taken += 1
        return taken

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")


def model_digest(name: str) -> str:
    """The first 12 hex digits of the SHA-256 of the shipped model's weights file."""
    return hashlib.sha256((MODEL_DIR / f"{name}.pt").read_bytes()).hexdigest()[:12]


def model_key(name: str, model) -> str:
    """The cache key of a shipped model's reconstructions at its current σ. A ridge network's
    energy at σ depends only on its composite filters, knot curvatures and β(σ) (and its
    class, knot spacing and boundary): the key is the digest of those, so two models that are
    the same energy at σ (a σ-aware model at a node it kept from the model it was made from)
    share their scores. Other models: the name and the digest of the weights file."""
    if not hasattr(model, "knot_curvatures"):
        return f"model={name}@{model_digest(name)}"
    with torch.no_grad():
        filters = model.effective_filters().double()
        alpha, beta = (v.double() for v in model.scalings())
        parts = (filters, model.knot_curvatures(filters, alpha), beta)
    digest = hashlib.sha256(
        f"{type(model).__name__} {model.knot_spacing!r} {model.boundary}".encode()
    )
    for t in parts:
        digest.update(t.contiguous().numpy().tobytes())
    return f"ridge-energy@{digest.hexdigest()[:12]}"


def noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """y = x + σ/255·ε, ε ~ N(0, I) from ``torch.Generator().manual_seed(seed)`` in float32."""
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x + sigma / 255.0 * eps.to(x.dtype).to(x.device)


def solve(regulariser, y: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    problem = reconstruction_problem(regulariser.to(y.device, y.dtype))
    tol = args.tol * y.numel() ** 0.5
    return reconstruct(problem, (y, y), x0=y, tol=tol, max_iter=args.max_iter)


def denoiser(regulariser, args: argparse.Namespace):
    """y ↦ the reconstruction of ``regulariser`` (see :func:`solve`)."""
    return lambda y: solve(regulariser, y, args)


def bm3d_denoiser(bm3d, sigma: float):
    """y ↦ ``bm3d.bm3d(y, sigma_psd=σ/255)`` (float64 NumPy in, y's dtype out)."""

    def denoise(y: torch.Tensor) -> torch.Tensor:
        est = bm3d.bm3d(y[0, 0].double().cpu().numpy(), sigma_psd=sigma / 255.0)
        return torch.as_tensor(est, dtype=y.dtype).view_as(y).to(y.device)

    return denoise


def scores(x: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    x = x.clamp(0, 1)
    return float(psnr(x, clean)[0]), float(ssim(x, clean)[0])


def tv_key(tv: SmoothedTV, solver: str) -> str:
    """The cache key of the reconstructions of ``tv`` solved with ``solver``'s settings."""
    with torch.no_grad():
        return f"TV λ={float(tv.strength):g} ν={float(tv.smoothing):g} {solver}"


def tune_key(sigma: float, crops: int, size: int, seed: int) -> str:
    """The cache key of the TV strength tuned at σ on ``crops`` training crops of ``size`` px."""
    grid = ",".join(f"{g:g}" for g in TV_GRID)
    return f"tune-tv σ={sigma:g} crops={crops}x{size} seed={seed} grid={grid}"


def tune_tv(
    train: list[torch.Tensor], sigma: float, args: argparse.Namespace, cache: Cache
) -> float:
    """λ of :data:`TV_GRID` with the best mean PSNR on random training crops."""
    key = tune_key(sigma, args.tune_crops, args.tune_crop_size, args.seed)
    if cache.get(key) is not None:
        return float(cache.get(key))
    crops = random_crops(train, args.tune_crop_size, args.tune_crops, generator=args.seed)
    y = noisy(crops, sigma, args.seed + 7 + int(sigma))
    strength = grid_search_tv((y, crops), TV_GRID, max_iter=2000, tol=1e-3).strength
    cache.put(key, strength)
    return strength


def evaluate(args: argparse.Namespace) -> dict:
    data = Path(args.data)
    if not (data / "test").is_dir() or not (data / "train").is_dir():
        sys.exit(f"imaging_quality: {data} needs train/ and test/ image folders")
    test_files = sorted(p for p in (data / "test").iterdir() if p.is_file())[: args.images]
    test = [t.to(args.device) for t in load_image_folder(data / "test", color=False)]
    test = test[: args.images]
    train = load_image_folder(data / "train", color=False)
    sigmas = [float(s) for s in args.sigmas.split(",") if s]
    models = model_list(args.models)
    model_sigmas = sigmas
    if args.model_sigmas is not None:
        model_sigmas = [float(s) for s in args.model_sigmas.split(",") if s]
    cache = Cache(args.cache)
    if args.reuse:
        print(f"{cache.reuse(args.reuse)} scores taken from {args.reuse}")
    bm3d = None
    if not args.no_bm3d:
        try:
            import bm3d
        except ImportError:
            print("bm3d is not installed (pip install bilevel[benchmarks]); BM3D skipped")
    out: dict = {
        "config": {
            k: v
            for k, v in vars(args).items()
            if k not in ("json", "markdown", "report_only", "reuse", "cache")
        },
        "torch": torch.__version__,
        "images": [p.name for p in test_files],
        "results": {},
    }
    for sigma in sigmas:
        start = time.perf_counter()
        lam = tune_tv(train, sigma, args, cache)
        seeds = [args.seed + 1000 * int(round(sigma)) + i for i in range(len(test))]
        methods: dict[str, dict[str, list[float]]] = {}

        solver = f"tol={args.tol:g} max-iter={args.max_iter}"
        tv = SmoothedTV(strength=lam)
        jobs = [("noisy", "noisy", lambda y: y)]
        jobs.append(("TV", tv_key(tv, solver), denoiser(tv, args)))
        if bm3d is not None:
            jobs.append(("BM3D", "BM3D", bm3d_denoiser(bm3d, sigma)))
        for name, at in models:
            if sigma not in (at or model_sigmas):
                continue
            reg = pretrained(name)
            if hasattr(reg, "set_noise_level"):
                reg.set_noise_level(sigma / 255.0)
            key = f"{model_key(name, reg)} {solver}"
            jobs.append((name, key, denoiser(reg, args)))
        for i, (clean, seed) in enumerate(zip(test, seeds)):
            x = clean.unsqueeze(0)
            y = noisy(x, sigma, seed)
            prefix = f"σ={sigma:g} image={test_files[i].name} noise-seed={seed}"
            for name, key, denoise in jobs:
                value = cache.get(f"{prefix} {key}")
                if value is None:
                    value = scores(denoise(y), x)
                    cache.put(f"{prefix} {key}", value)
                methods.setdefault(name, {"psnr": [], "ssim": []})
                methods[name]["psnr"].append(value[0])
                methods[name]["ssim"].append(value[1])
            line = ", ".join(f"{k} {v['psnr'][-1]:.2f}" for k, v in methods.items())
            print(f"σ = {sigma:g}, image {i + 1}/{len(test)} ({test_files[i].name}): {line}")
        for v in methods.values():
            v["mean_psnr"] = sum(v["psnr"]) / len(v["psnr"])
            v["mean_ssim"] = sum(v["ssim"]) / len(v["ssim"])
        out["results"][f"{sigma:g}"] = {
            "tv_strength": lam,
            "noise_seeds": seeds,
            "seconds": round(time.perf_counter() - start, 1),
            "keys": {name: key for name, key, _ in jobs},
            "methods": methods,
        }
    return out


def _options(cfg: dict) -> str:
    """The command-line options that reproduce the evaluation of ``cfg``."""
    keys = ("images", "sigmas", "models", "model_sigmas", "tune_crops", "tune_crop_size")
    keys += ("tol", "max_iter", "seed")
    return " ".join(
        f"--{k.replace('_', '-')} {cfg[k]}" for k in keys if cfg.get(k) not in ("", None)
    )


def markdown(result: dict, path: Path) -> None:
    """The report: mean PSNR / SSIM per σ and method, and a figure of the means."""
    from bilevel.runs import new_figure

    cfg = result["config"]
    lines = [
        "# Benchmark: denoising quality on BSDS300 test images",
        "",
        "Generated by `python benchmarks/imaging_quality.py "
        + _options(cfg)
        + "`; torch "
        + result["torch"]
        + ". "
        f"{len(result['images'])} test image{'s' * (len(result['images']) != 1)} (the first by "
        "file name), full size, grayscale; "
        "noise seeds per image in the JSON. TV strength tuned on "
        f"{cfg['tune_crops']} crops of {cfg['tune_crop_size']} px of the training images.",
        "",
        "| σ | TV λ | method | mean PSNR (dB) | − TV (dB) | mean SSIM |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for sigma, r in result["results"].items():
        tv = r["methods"]["TV"]["mean_psnr"]
        for name, v in r["methods"].items():
            lines.append(
                f"| {sigma} | {r['tv_strength']:g} | {name} | {v['mean_psnr']:.2f} | "
                f"{v['mean_psnr'] - tv:+.2f} | {v['mean_ssim']:.4f} |"
            )
    lines += ["", *targets(result), "", *training_notes(cfg["models"])]
    lines += ["How the models were trained and why targets are missed: ", ""]
    lines[-2] += "[benchmarks_imaging_quality.md](benchmarks_imaging_quality.md)."
    fig = new_figure(10, 4.4)
    gain_axes(fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2), result)
    figure = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    lines += ["", f"![mean PSNR per method]({figure.name})", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def gain_axes(left, right, result: dict) -> None:
    """Left: mean PSNR − TV per σ and method (bars; TV's mean PSNR under each σ). Right: per
    test image at σ = 25 (else the first σ), PSNR − TV of each method, images sorted by
    BM3D's gain (or the first method's)."""
    sigmas = list(result["results"])
    names = []
    for r in result["results"].values():
        names += [n for n in r["methods"] if n not in ("noisy", "TV") and n not in names]
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, gains = [], []
        for i, s in enumerate(sigmas):
            m = result["results"][s]["methods"]
            if name in m:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                gains.append(m[name]["mean_psnr"] - m["TV"]["mean_psnr"])
        bars = left.bar(xs, gains, width, label=name, color=f"C{j}")
        left.bar_label(bars, fmt="%+.2f", fontsize=6, rotation=90, padding=2)
    ticks = [
        f"σ = {s}\nTV {result['results'][s]['methods']['TV']['mean_psnr']:.2f} dB" for s in sigmas
    ]
    left.set_xticks(range(len(sigmas)), ticks)
    left.axhline(0, color="k", lw=0.8)
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_ylabel("mean PSNR − TV (dB)")
    n = len(result["images"])
    left.set_title(f"mean gain over tuned TV, {n} images (dashed: +1 dB)", fontsize=9)
    left.set_ylim(top=left.get_ylim()[1] * 1.15)  # room for the rotated labels
    left.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, -0.2), ncol=2)
    s = "25" if "25" in result["results"] else sigmas[0]
    m = result["results"][s]["methods"]
    tv = m["TV"]["psnr"]
    key = "BM3D" if "BM3D" in m else next((n for n in names if n in m), "TV")
    order = sorted(range(len(tv)), key=lambda i: m[key]["psnr"][i] - tv[i])
    for j, name in enumerate(names):
        if name in m:
            gain = [m[name]["psnr"][i] - tv[i] for i in order]
            right.plot(range(len(order)), gain, ".-", ms=3, lw=0.6, label=name, color=f"C{j}")
    right.axhline(0, color="k", lw=0.8)
    right.set_xlabel(f"test image (sorted by {key} − TV)")
    right.set_ylabel("PSNR − TV (dB)")
    right.set_title(f"per image, σ = {s}", fontsize=9)
    right.legend(fontsize=7)


def model_list(spec: str) -> list[tuple[str, list[float] | None]]:
    """``"a,b@15+50"`` → [("a", None), ("b", [15.0, 50.0])]: the models of ``--models`` and
    the σ at which each is evaluated (None: those of ``--model-sigmas``)."""
    out = []
    for item in (m.strip() for m in spec.split(",") if m.strip()):
        name, _, at = item.partition("@")
        try:
            out.append((name, [float(s) for s in at.split("+")] if at else None))
        except ValueError:
            sys.exit(f"imaging_quality: --models wants NAME or NAME@S+S..., got {item!r}")
    return out


def training_notes(models: str) -> list[str]:
    """How each evaluated shipped model was trained, from its record."""
    out = []
    for name, _ in model_list(models):
        info = model_info(name)
        train = info.get("training", {})
        summary = train.get("summary", {})
        start = train.get("initialised_from")
        made = (
            f"trained by `{train.get('command', '?')}`"
            if "chain" not in train or start is None
            else "trained by the chain "
            + "; ".join(f"`{c}`" for c in train["chain"])
            + f" (the last run continued {start['name']} with the same data and options)"
        )
        out += [
            f"**{name}** ({info.get('description', info['class'])}): {made} on "
            f"{train.get('data', '?')}; seed {train.get('seed', '?')}; "
            + ("last run: " if start is not None else "")
            + f"{summary.get('steps', '?')} Adam-ISGD steps, "
            f"{summary.get('oracle_calls', '?')} oracle calls, {summary.get('wall_time_s', '?')} s "
            f"({summary.get('status', '?')}). "
            + (
                "Validation PSNR (dB): "
                + ", ".join(f"{k} {v:.2f}" for k, v in summary["val_psnr"].items())
                if "val_psnr" in summary
                else "PSNR on its run's test crops (dB): "
                + ", ".join(f"{k} {v['psnr']:.2f}" for k, v in summary.get("test", {}).items())
            ),
            "",
        ]
    return out


def targets(result: dict) -> list[str]:
    """The issue's targets at σ = 25, stated from the measured means: the convex model
    ≥ TV + 1.0 dB and the best learned model ≥ BM3D."""
    r = result["results"].get("25")
    if r is None:
        return ["No σ = 25 run: the targets (convex ≥ TV + 1 dB, best learned ≥ BM3D) untested."]
    m = {k: v["mean_psnr"] for k, v in r["methods"].items()}
    learned = [k for k in m if k not in ("noisy", "TV", "BM3D")]
    if not learned:
        return ["No learned model was evaluated."]
    out = ["**Targets at σ = 25** (means over the images above):", ""]
    for name in learned:
        gain = m[name] - m["TV"]
        if pretrained(name).convex:
            verdict = "met" if gain >= 1.0 else f"missed by {1.0 - gain:.2f} dB"
            out.append(f"- convex {name} − TV = {gain:+.2f} dB (target ≥ +1.0): {verdict}")
        else:
            out.append(f"- {name} (not convex) − TV = {gain:+.2f} dB (no target)")
    best = max(learned, key=m.__getitem__)
    if "BM3D" in m:
        gap = m[best] - m["BM3D"]
        verdict = "met" if gap >= 0 else f"missed by {-gap:.2f} dB"
        out.append(f"- best learned ({best}) − BM3D = {gap:+.2f} dB (target ≥ 0): {verdict}")
    return out


def record(result: dict, name: str) -> None:
    """Store the model's scores at its own σ (and the baselines') in its pretrained record
    (``test``); for a σ-aware model (noise nodes) also its scores at every σ evaluated
    (``test_by_sigma``, keyed by σ), its own σ then optional."""
    info = model_info(name)
    aware = info["kwargs"].get("noise_nodes") is not None

    def scores_at(sigma: str) -> dict | None:
        r = result["results"].get(sigma)
        if r is None or name not in r["methods"]:
            return None
        m = r["methods"]
        return {
            "set": "BSDS300 test images (first by file name), full size, grayscale",
            "images": len(result["images"]),
            "psnr": m[name]["mean_psnr"],
            "ssim": m[name]["mean_ssim"],
            "baselines_psnr": {k: v["mean_psnr"] for k, v in m.items() if k != name},
            "noise_seeds": r["noise_seeds"],
            "command": "python benchmarks/imaging_quality.py " + _options(result["config"]),
        }

    own = scores_at(f"{float(info['sigma']):g}")
    if own is None and not aware:
        sys.exit(f"imaging_quality: no result of {name} at its σ = {info['sigma']}")
    if own is not None:
        info["test"] = own
    if aware:
        found = {s: scores_at(s) for s in result["results"]}
        info["test_by_sigma"] = {
            **info.get("test_by_sigma", {}),
            **{s: v for s, v in found.items() if v is not None},
        }
    path = MODEL_DIR / f"{name}.json"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(f"recorded the test scores of {name} in {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # full-size images: reuse the response tensors' pages
    if args.report_only:
        result = json.loads(Path(args.json).read_text(encoding="utf-8"))
    else:
        result = evaluate(args)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for sigma, r in result["results"].items():
        means = ", ".join(f"{k} {v['mean_psnr']:.2f}" for k, v in r["methods"].items())
        print(f"σ = {sigma}: mean PSNR {means} (TV λ = {r['tv_strength']:g})")
    if args.markdown:
        markdown(result, Path(args.markdown))
    if args.record:
        record(result, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
