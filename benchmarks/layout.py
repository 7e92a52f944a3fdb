"""Row-major against column-major storage of a dense design matrix X (n × d), one thread.

The products a linear model spends its time in are z = X·v (``F.linear(v, X)``: the
predictions) and g = Xᵀ·r (the gradient's data term), with one right-hand side (one
lower-level instance, one Hessian-vector product) or a few (instances stacked as rows of V).
PyTorch computes them with the same BLAS call whichever way X is stored, but with the
transposed flag swapped; this script times both layouts:

* **row-major**: X contiguous (C order, rows adjacent: what ``torch.randn(n, d)`` gives);
* **column-major**: ``X.t().contiguous().t()`` (Fortran order, columns adjacent; the same
  values and shape).

and the cost of gathering a sorted random minibatch of b rows (``index_select`` into a
reused output, then its product with one vector), which reads b·d scattered elements from
column-major storage against b contiguous rows from row-major storage.

``--hpo N,D,STEPS[,DTYPE[,METHOD]]`` instead times ``STEPS`` upper steps of ``bilevel hpo``'s
AID-CG (L-BFGS lower solves, CG adjoints, warm starts; or METHOD ``sid`` or ``itd``;
:func:`bilevel.learning.hpo.hpo_method`) for
per-feature ℓ2 logistic regression on a synthetic N × D set (float64 by default; split
60/20/20), with the model's features stored row-major against column-major, runs
alternating, and compares the θ they reach.

Each cell: median over ``--repeats`` interleaved repeats (the layouts alternate within each
repeat) of the thread CPU time per call, averaged over a batch of calls of at least ~20 ms.
:func:`bilevel.allocator.keep_freed_memory` is applied first, so that outputs of tens of MB
reuse freed memory instead of fresh zeroed pages.
Usage: python benchmarks/layout.py [--repeats 11] [--quick] [--hpo 20000,200,30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bilevel.allocator import keep_freed_memory

SHAPES = ((569, 30), (16_000, 20), (16_000, 200), (16_000, 1000), (200_000, 20), (200_000, 100))
"""(n, d): breast cancer (a), the overhead benchmark's (b) training rows and (c), and d = 20,
1000 besides."""

GATHERS = ((600_000, 20, 50_000), (200_000, 100, 20_000), (200_000, 300, 20_000))
"""(n, d, b): minibatches of b sorted random rows."""


def per_call(fn, target: float = 0.02) -> float:
    """Thread CPU seconds per call of ``fn``, over a batch of calls of about ``target`` s."""
    start = time.thread_time()
    fn()
    once = max(time.thread_time() - start, 1e-6)
    calls = max(1, min(1000, int(target / once)))
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls


def interleaved(cases: dict, repeats: int) -> dict:
    """Median thread CPU seconds per call of each case, the cases alternating per repeat."""
    times = {key: [] for key in cases}
    keys = list(cases)
    for r in range(repeats):
        turn = r % len(keys)
        for key in keys[turn:] + keys[:turn]:
            times[key].append(per_call(cases[key]))
    return {key: statistics.median(v) for key, v in times.items()}


def products(n: int, d: int, dtype: torch.dtype, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x_row = torch.randn(n, d, generator=gen, dtype=dtype)
    x_col = x_row.t().contiguous().t()
    v1 = torch.randn(1, d, generator=gen, dtype=dtype)
    r1 = torch.randn(1, n, generator=gen, dtype=dtype)
    v4 = torch.randn(4, d, generator=gen, dtype=dtype)
    r4 = torch.randn(4, n, generator=gen, dtype=dtype)
    cases = {}
    for layout, x in (("row", x_row), ("col", x_col)):
        cases["Xv", layout] = lambda x=x: F.linear(v1, x)
        cases["Xᵀr", layout] = lambda x=x: r1 @ x
        cases["XV (4)", layout] = lambda x=x: F.linear(v4, x)
        cases["XᵀR (4)", layout] = lambda x=x: r4 @ x
    return interleaved(cases, repeats)


def gathers(n: int, d: int, b: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x_row = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x_col = x_row.t().contiguous().t()
    idx = torch.randperm(n, generator=gen)[:b].sort().values
    v = torch.randn(1, d, generator=gen, dtype=torch.float64)
    out = torch.empty(b, d, dtype=torch.float64)
    cases = {}
    for layout, x in (("row", x_row), ("col", x_col)):
        cases["gather", layout] = lambda x=x: torch.index_select(x, 0, idx, out=out)
        cases["gather + Xv", layout] = lambda x=x: F.linear(v, x.index_select(0, idx))
    return interleaved(cases, repeats)


def hpo_runs(n: int, d: int, steps: int, repeats: int, dtype: torch.dtype, name: str) -> dict:
    """Thread CPU seconds of ``steps`` upper steps of ``name`` (medians over ``repeats`` runs per
    layout, alternating) and the largest difference of the final θ between the layouts."""
    from bilevel import Budget
    from bilevel.learning import (
        build_model,
        hpo_method,
        lower_instances,
        make_synthetic_classification,
        split_data,
    )

    X, y, _ = make_synthetic_classification(n, d, d // 10, seed=0, dtype=dtype)
    data = split_data(X, y, n_classes=2, seed=0)
    times: dict[str, list[float]] = {"row": [], "column": []}
    thetas: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for layout in ("row", "column") if r % 2 == 0 else ("column", "row"):
            model = build_model(data, "logistic", theta0=-2.0)
            method = hpo_method(model, name)
            model.store_features(layout, layout)
            model.smoothness()  # ‖X‖₂² by power iteration, once per model: not a step's time
            start = time.thread_time()
            method.run(
                model.problem,
                lower_instances(model),
                Budget(steps=steps),
                progress=False,
                plot=False,
            )
            times[layout].append(time.thread_time() - start)
            thetas[layout] = model.theta.detach().clone()
    diff = float((thetas["row"] - thetas["column"]).abs().max())
    return {key: statistics.median(v) for key, v in times.items()} | {"theta_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--quick", action="store_true", help="3 repeats, the first shapes only")
    parser.add_argument(
        "--hpo", default=None, help="N,D,STEPS[,DTYPE[,METHOD]]: only time hpo upper steps"
    )
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(1)
    kept = keep_freed_memory()
    print(f"torch {torch.__version__}, 1 thread, {repeats} repeats, freed memory kept: {kept}")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.hpo:
        n, d, steps, *rest = args.hpo.split(",")
        n, d, steps = int(n), int(d), int(steps)
        dtype = getattr(torch, rest[0] if rest else "float64")
        name = rest[1] if len(rest) > 1 else "aid-cg"
        res = hpo_runs(n, d, steps, repeats, dtype, name)
        print(
            f"{name}, {steps} upper steps, {n} × {d} {dtype}: row-major {res['row']:.2f} s, "
            f"column-major {res['column']:.2f} s, ratio {res['row'] / res['column']:.2f}; "
            f"max |θ_row − θ_col| {res['theta_diff']:.1e}"
        )
        print(f"load average {os.getloadavg()[0]:.2f}")
        return
    shapes = SHAPES[:3] if args.quick else SHAPES
    print("thread CPU time per call in ms (medians), row-major / column-major, ratio row ÷ col")
    for dtype in (torch.float32, torch.float64):
        for n, d in shapes:
            med = products(n, d, dtype, repeats)
            for op in ("Xv", "Xᵀr", "XV (4)", "XᵀR (4)"):
                row, col = med[op, "row"], med[op, "col"]
                print(
                    f"{str(dtype)[6:]:8s} {n:>7d} × {d:<5d} {op:8s} "
                    f"{1e3 * row:9.3f} {1e3 * col:9.3f}  {row / col:5.2f}",
                    flush=True,
                )
    for n, d, b in GATHERS[:1] if args.quick else GATHERS:
        med = gathers(n, d, b, repeats)
        for op in ("gather", "gather + Xv"):
            row, col = med[op, "row"], med[op, "col"]
            print(
                f"float64  {n:>7d} × {d:<5d} b={b:<6d} {op:12s} "
                f"{1e3 * row:9.3f} {1e3 * col:9.3f}  {row / col:5.2f}",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
