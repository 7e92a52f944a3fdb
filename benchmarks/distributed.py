"""Parallel efficiency of data-parallel runs (bilevel.distributed) and a communication model.

Measures T₁ (one process) and T_N (N processes, gloo, one thread each) for a fixed number of
upper-level steps of

* FoE denoising: Adam-ISGD with warm-started Nesterov/CG solves, a minibatch of ``--foe-batch``
  crops split over the processes by sample ownership;
* SID (``bilevel hpo --method sid``): logistic regression on a synthetic set of
  ``--sid-samples`` rows (default 10⁶) split into blocks, fixed t = k = ``--inner-steps``,
  minibatches of ``--sid-batch`` rows per inner iteration, SVRG anchors every ⌈N/b⌉ iterations;
* ``floor`` (not run by default): SID's synchronisation pattern without SID, a minimal program
  of ``--floor-syncs`` dependent all-reduces per step with ``--floor-ms`` of one process's
  compute between two of them, part of it done in the waits (``--floor-ahead``): the
  efficiency this machine's collectives leave to any program that synchronises that often;

and reports the efficiency T₁ / (N·T_N) (medians of interleaved repeats, and the fastest
runs). Each process counts its collectives (messages and bytes all-reduced per step), and an
all-reduce micro-benchmark gives the latency α and bandwidth β of this machine; from them the
model

    T_N = o + (C − o)·I(N)/N + M·α·⌈log₂ N⌉ + 2 (N−1)/N · V/β,       E(N) = C / (N·T_N)

predicts the efficiency at 8 and 64 processes, for this problem (strong scaling) and for one
N/2 times as large (weak scaling: each process keeps its work at N = 2). C is one process's
CPU seconds per step; o the CPU seconds per step that every process spends whatever its share
(per-call overheads of small batches, the replicated upper-level step, the CPU time of the
collectives), measured as the CPU seconds of two processes together minus those of one; M
messages and V bytes per step; I(N) the load imbalance of the split: ⌈B/N⌉/(B/N) for this
benchmark's minibatch (the whole training set of B images, owned i mod N; a random minibatch
of a larger set is more uneven: E[max_r B_r]/(B/N), printed too), 1 for SID's blocks. Each
process reports its CPU seconds: on a loaded machine T₁/(N·T_N) mixes the algorithm's overhead
with the CPU time the processes did not get; the CPU efficiency (CPU seconds of one process
over those of all N) and the share of T_N rank 0 spent in collectives separate the two. The
CPU seconds of the main threads alone (the algorithm's work, without the threads of gloo that
carry the collectives), less those they spend inside the collectives (polling for their
completion), show whether the split itself repeats work on every process; each rank's share
of T_N in collectives shows which one waits. ``--bind`` pins each process, gloo's threads
included, to a core of its own (rank r to core r, the single process to core 0). Every
process keeps freed memory for reuse (:func:`bilevel.allocator.keep_freed_memory`, as the
command line does): otherwise one process faults in its large minibatch afresh at every
iteration and two processes with half as large blocks may not, which made one process 1.6×
slower than two together at 100 features.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py            # full sizes
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --quick    # small, for a smoke test
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --cases sid --features 100
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --bind     # one core per process
    OMP_NUM_THREADS=1 python benchmarks/distributed.py --cases sid,floor   # SID and its floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bilevel import distributed
from bilevel.allocator import keep_freed_memory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counter:
    """Counts the collectives of this process (by wrapping torch.distributed's functions) and
    the seconds spent in them, waiting for the other processes included (by wrapping
    :meth:`bilevel.distributed.Shard._collective`, which also waits for their completion)."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.seconds = 0.0
        self.cpu = 0.0  # of the main thread, inside the collectives (their polling)
        self.ahead = 0.0  # of the main thread, on work done while an all-reduce is in flight
        for name in ("all_reduce", "broadcast"):
            self._wrap(name)
        collective = distributed.Shard._collective

        def timed(shard: distributed.Shard, what: str, fn: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return collective(shard, what, fn)
            finally:
                self.seconds += time.perf_counter() - start
                self.cpu += time.thread_time() - cpu

        distributed.Shard._collective = timed  # type: ignore[method-assign]
        sum_all = distributed.Shard.sum_all

        def timed_ahead(shard: distributed.Shard, tensors: Any, meanwhile: Any = None) -> Any:
            if meanwhile is None:
                return sum_all(shard, tensors)
            work = meanwhile

            def timed_work() -> None:
                cpu = time.thread_time()
                try:
                    work()
                finally:
                    self.ahead += time.thread_time() - cpu

            return sum_all(shard, tensors, timed_work)

        distributed.Shard.sum_all = timed_ahead  # type: ignore[method-assign]

    def _wrap(self, name: str) -> None:
        original = getattr(dist, name)

        def wrapped(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.messages += 1
            self.bytes += t.numel() * t.element_size()
            return original(t, *args, **kwargs)

        setattr(dist, name, wrapped)


def _foe(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build, make_method
    from bilevel.methods import with_initial

    args = job_config(
        "denoise",
        crop=cfg["crop"],
        train_size=cfg["foe_batch"],
        test_size=1,
        val_size=0,
        batch_size=cfg["foe_batch"],
        dtype="float64",
    )
    setup = build(args)
    samples = with_initial(setup.train, lambda b: b[0].clone())
    return make_method(args), setup.problem, samples


def _sid(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    from bilevel.learning.evaluation import lower_instances
    from bilevel.learning.hpo import build_model, hpo_method, load_data

    data = load_data(f"synthetic:{cfg['sid_samples']}:{cfg['features']}", regression=False)
    model = build_model(data, "logistic", theta0=0.0)
    # ‖X‖₂² (power iteration over all rows, once per run on every rank, ~0.8 s at 10⁶ × 20):
    # set-up, like reading the data, not part of the steps timed
    model.smoothness()
    method = hpo_method(
        model,
        "sid",
        inner_steps=cfg["inner_steps"],
        batch_size=cfg["sid_batch"],
        sid_solver="svrg",
    )
    return method, model.problem, lower_instances(model)


class _Floor:
    """The floor of SID's pattern on this machine: a minimal program with no algorithm, only
    its synchronisations. Per step ``floor_syncs`` dependent all-reduces of 16 numbers through
    :meth:`bilevel.distributed.Shard.sum_all` (the library's collective, polling included);
    between two of them one process computes ``floor_units`` 96 × 96 float64 matrix products
    (cache-resident, so no memory effects), a rank its 1/N share, of which the fraction
    ``floor_ahead`` of the next iteration's share runs while the all-reduce is in flight, as
    SID's work ahead does. Its efficiency is what the synchronisations alone leave of
    perfect scaling."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.syncs, self.ahead = cfg["floor_syncs"], cfg["floor_ahead"]
        self.units = cfg["floor_units"]
        self.a = torch.randn(
            96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )

    def _work(self, units: int) -> None:
        for _ in range(units):
            torch.mm(self.a, self.a)

    def run(self, problem: Any, samples: Any, opts: dict[str, Any], **_: Any) -> None:
        shard = distributed.current()
        share = self.units // (shard.world if shard is not None else 1)
        ahead = round(self.ahead * share) if shard is not None else 0
        buf, done = torch.zeros(16, dtype=torch.float64), 0
        for _ in range(opts["steps"] * self.syncs):
            self._work(share - done)
            if shard is None:
                continue
            shard.sum_all([buf], lambda: self._work(ahead))
            done = ahead


def _floor(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    return _Floor(cfg), None, None


def calibrate_units(ms: float) -> int:
    """Number of 96 × 96 float64 matrix products that take ``ms`` milliseconds here."""
    a = torch.randn(96, 96, dtype=torch.float64)
    for _ in range(500):
        torch.mm(a, a)
    start, reps = time.perf_counter(), 3000
    for _ in range(reps):
        torch.mm(a, a)
    return max(2, round(ms * 1e-3 * reps / (time.perf_counter() - start)))


def _bind(rank: int) -> None:
    """Bind this process (its threads to come, gloo's included) to core ``rank`` mod the
    cores it may use."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})


def _worker(rank: int, world: int, port: int, case: str, cfg: dict[str, Any], out: str) -> None:
    if cfg["bind"]:
        _bind(rank)
    torch.set_num_threads(1)
    keep_freed_memory()  # as the command line does: no page faults for recurring large blocks
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
        distributed.init_from_env(backend="gloo")
    build = {"foe": _foe, "sid": _sid, "floor": _floor}[case]
    method, problem, samples = build(cfg)  # one untimed step: lazy imports, first calls
    method.run(problem, samples, {"steps": 1}, progress=False, plot=False)
    method, problem, samples = build(cfg)
    counter = _Counter() if world > 1 else None
    shard = distributed.current()
    if shard is not None:
        dist.barrier()
    start, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
    method.run(problem, samples, {"steps": cfg["steps"]}, progress=False, plot=False)
    cpu, main = time.process_time() - cpu, time.thread_time() - main
    if shard is not None:
        dist.barrier()
    total = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": total, "cpu": cpu, "main": main, "polling": 0.0}
    if shard is not None and counter is not None:  # CPU seconds of all processes
        waits = shard.gather_object((counter.seconds, counter.cpu))
        cpu, main, polling, ahead = shard.sum_floats([cpu, main, counter.cpu, counter.ahead])
        result.update(cpu=cpu, main=main, polling=polling, ahead=ahead)
        result.update(waits=[w for w, _ in waits])
        result.update(messages=counter.messages, bytes=counter.bytes, waiting=counter.seconds)
        result.update(_latency_bandwidth())
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    distributed.leave(0)  # not the interpreter's exit: gloo's destructors may abort it


def _latency_bandwidth() -> dict[str, float]:
    """α (s per small all-reduce) and β (bytes/s of a 4 MB all-reduce) among the processes."""
    small, big = torch.zeros(1, dtype=torch.float64), torch.zeros(2**19, dtype=torch.float64)
    times = []
    for t, reps in ((small, 200), (big, 10)):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        times.append((time.perf_counter() - start) / reps)
    world = dist.get_world_size()
    alpha = times[0]
    beta = 2 * (world - 1) / world * big.numel() * 8 / max(times[1] - alpha, 1e-9)
    return {"alpha": alpha, "beta": beta}


def _run(case: str, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world, port, case, cfg, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        if not Path(out).is_file():
            raise RuntimeError(f"{case} with {world} processes failed (exit codes {codes})")
        if any(codes):
            print(f"  note: {case} on {world} processes: exit codes {codes} after the result")
        return json.loads(Path(out).read_text())


def split_imbalance(batch: int, world: int) -> float:
    """⌈B/N⌉ / (B/N): the largest share of a minibatch of B distinct owners i mod N."""
    return math.ceil(batch / world) / (batch / world)


def imbalance(batch: int, world: int, trials: int = 4000) -> float:
    """E[max_r B_r] / (B/N) for a uniformly random minibatch of ``batch`` samples of a large
    set split by ownership i mod N (Monte Carlo)."""
    if world == 1:
        return 1.0
    gen = torch.Generator().manual_seed(0)
    owners = torch.randint(world, (trials, batch), generator=gen)
    counts = torch.nn.functional.one_hot(owners, world).sum(1)
    return float(counts.max(1).values.float().mean()) / (batch / world)


def predict(
    compute: float,
    fixed: float,
    messages: float,
    volume: float,
    alpha: float,
    beta: float,
    world: int,
    imb: float,
) -> float:
    """E(N) of the model in the module docstring (one step; ``fixed`` is o)."""
    comm = messages * alpha * math.ceil(math.log2(world)) + 2 * (world - 1) / world * volume / beta
    return compute / (world * (fixed + (compute - fixed) * imb / world + comm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="foe,sid")
    parser.add_argument("--foe-batch", type=int, default=64)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--sid-samples", type=int, default=1_000_000)
    parser.add_argument("--sid-batch", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--floor-ms",
        type=float,
        default=11.4,
        help="floor case: one process's compute between two all-reduces (ms; SID's C / M)",
    )
    parser.add_argument(
        "--floor-syncs", type=int, default=23, help="floor case: all-reduces per step"
    )
    parser.add_argument(
        "--floor-ahead",
        type=float,
        default=0.67,
        help="floor case: fraction of a rank's work done while an all-reduce is in flight",
    )
    parser.add_argument(
        "--bind",
        action="store_true",
        help="bind each process to its own core (rank r to core r; one process to core 0)",
    )
    args = parser.parse_args()
    cfg = {k: v for k, v in vars(args).items() if k not in ("quick", "repeats", "cases")}
    if args.quick:
        cfg.update(foe_batch=8, crop=16, sid_samples=20_000, sid_batch=2_000, steps=2)
    torch.set_num_threads(1)
    cfg["floor_units"] = calibrate_units(args.floor_ms)  # the same work for T₁ and T₂
    for case in args.cases.split(","):
        load_before = os.getloadavg()
        times: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        mains: dict[int, list[float]] = {1: [], 2: []}
        polls: list[float] = []
        aheads: list[float] = []
        comm: dict[str, Any] = {}
        waiting: list[float] = []
        waits: list[list[float]] = []
        for _ in range(args.repeats):  # interleaved: the load of the machine hits both alike
            for world in (1, 2):
                r = _run(case, world, cfg)
                times[world].append(r["seconds"])
                cpus[world].append(r["cpu"])
                mains[world].append(r["main"])
                if world == 2:
                    comm = r
                    waiting.append(r["waiting"] / r["seconds"])
                    waits.append([w / r["seconds"] for w in r["waits"]])
                    polls.append(r["polling"])
                    aheads.append(r["ahead"])
        t1, t2 = statistics.median(times[1]), statistics.median(times[2])
        steps = cfg["steps"]
        messages, volume = comm["messages"] / steps, comm["bytes"] / steps
        print(f"\n{case}: {json.dumps(cfg)}")
        loads = ", ".join(f"{a:.1f}" for a in (*load_before, *os.getloadavg()))
        print(f"  load average (1, 5, 15 min) before, after: {loads}")
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(times[1], times[2]))
        print(f"  T1 = {t1:.2f} s, T2 = {t2:.2f} s (medians; runs T1/T2: {runs} s)")
        print(
            f"  efficiency T1/(2 T2) = {t1 / (2 * t2):.3f} (medians), "
            f"{min(times[1]) / (2 * min(times[2])):.3f} (fastest runs); rank 0 spent "
            f"{100 * statistics.median(waiting):.0f} % of T2 in collectives (rank 1: "
            f"{100 * statistics.median(w[1] for w in waits):.0f} %)"
        )
        c1, c2 = statistics.median(cpus[1]), statistics.median(cpus[2])
        print(
            f"  CPU seconds: one process {c1:.2f}, two together {c2:.2f}: CPU efficiency "
            f"{c1 / c2:.3f}; CPU share of the wall time: {c1 / t1:.2f} (one), "
            f"{c2 / (2 * t2):.2f} (each of two)"
        )
        m1, m2 = statistics.median(mains[1]), statistics.median(mains[2])
        print(
            f"  of which the main threads (the algorithm; the rest is the collectives' threads): "
            f"one process {m1:.2f}, two together {m2:.2f}: {m1 / m2:.3f}"
        )
        p2 = statistics.median(polls)
        print(
            f"  main threads outside the collectives (the work, without their polling): one "
            f"process {m1:.2f}, two together {m2 - p2:.2f}: {m1 / (m2 - p2):.3f}; per step "
            f"{m1 / steps * 1e3:.1f} ms and {(m2 - p2) / steps * 1e3:.1f} ms"
        )
        a2 = statistics.median(aheads)
        print(
            f"  of the two processes' work per step, {a2 / steps * 1e3:.1f} ms in the waits of "
            f"all-reduces (work ahead) and {(m2 - p2 - a2) / steps * 1e3:.1f} ms outside them"
        )
        compute, fixed = c1 / steps, min(max(c2 - c1, 0.0), c1) / steps
        print(
            f"  per step: compute C = {compute * 1e3:.1f} ms (CPU), of which o = "
            f"{fixed * 1e3:.1f} ms on every process; {messages:.1f} messages, {volume:.0f} "
            f"bytes all-reduced; α = {comm['alpha'] * 1e6:.0f} µs, "
            f"β = {comm['beta'] / 1e6:.0f} MB/s"
        )
        batch = cfg["foe_batch"] if case == "foe" else None
        for world in (2, 8, 64):
            # strong scaling: this problem on N processes; weak: N/2 times this problem
            # (minibatch or rows), so each process keeps the work it has at N = 2
            imb = split_imbalance(batch, world) if batch is not None else 1.0
            weak_imb = split_imbalance(batch * world // 2, world) if batch is not None else 1.0
            model = (messages, volume, comm["alpha"], comm["beta"], world)
            strong = predict(compute, fixed, *model, imb)
            weak = predict(compute * world / 2 - fixed * (world / 2 - 1), fixed, *model, weak_imb)
            random = f", random minibatch {imbalance(batch, world):.2f}" if batch else ""
            print(
                f"  model N = {world:>2}: strong scaling {strong:.3f}, weak scaling {weak:.3f} "
                f"(imbalance {imb:.2f}{random})"
            )


if __name__ == "__main__":
    main()
