"""Data-parallel bilevel learning on ``torch.distributed``.

``torchrun --nproc-per-node N -m bilevel JOB ...`` starts N processes (ranks); each calls
:func:`init_from_env`, which joins the process group that torchrun's environment describes
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; multi-node through torchrun's
rendezvous options), with the gloo backend on CPU and NCCL on CUDA. With one process nothing
is initialised and every code path is the single-process one.

Two kinds of data parallelism, both giving every rank the same reduced values, so that every
rank takes the same upper-level step:

* **Instances** (ISGD, Adam-ISGD, MAID, HOAG with :class:`~bilevel.hypergrad.Implicit` and
  the other batched estimators): sample i of the n training samples is owned by rank
  i mod N (:meth:`Shard.owned`). A minibatch (the same on every rank: the sampler's
  generator is shared) is split by ownership; each rank solves the lower-level and adjoint
  problems of its instances, warm-started from the solutions it keeps for them, and
  :func:`reduce_hypergradient` all-reduces z = Σ_r (B_r/B) z_r, the loss likewise, the
  oracle counts (sums), μ (minimum) and the bound ω = Σ_r (B_r/B) ω_r. That ω bounds
  ‖z − ∇F‖ by the triangle inequality, since ω_r bounds the error of the mean over rank r's
  instances; at N = 1 it is the single-process ω, and for N > 1 it is looser by at most √N in
  its ‖J‖-term. MAID's line search and accuracy decisions use the reduced values.
* **Rows** (SID): the finite sum of N samples is split into contiguous blocks
  (:meth:`Shard.block`); each rank draws its share b_r of every minibatch from its block with
  its own generators, and every minibatch gradient, Hessian-vector product and stage-3
  Jacobian product is combined as Σ_r (N_r/N)·(estimate on rank r), a stratified estimate
  of the same mean (:meth:`Shard.combine`). Full gradients (the SVRG anchor) are the block
  gradients combined the same way.

Checkpoints are written by rank 0 only, after every rank has contributed its warm starts and
generator states (:meth:`Shard.merge_rows`, :meth:`Shard.gather_object`), so they do not
depend on N: a run resumes on any number of processes. A collective that fails (a rank died,
or did not answer within the timeout) raises :class:`DistributedError` on the others.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from bilevel.problem import BilevelError

__all__ = [
    "DEFAULT_POLL",
    "DEFAULT_TIMEOUT",
    "POLL_VARIABLE",
    "TIMEOUT_VARIABLE",
    "DistributedError",
    "Shard",
    "current",
    "init_from_env",
    "is_writer",
    "leave",
    "on_writer",
    "once",
    "reduce_hypergradient",
    "shutdown",
]

#: Seconds a collective may wait for the other ranks before it fails.
DEFAULT_TIMEOUT = 300.0
#: Environment variable that overrides :data:`DEFAULT_TIMEOUT` (seconds).
TIMEOUT_VARIABLE = "BILEVEL_DIST_TIMEOUT"
#: Seconds a collective of the CPU (gloo) backend polls for its completion, yielding the
#: processor between polls, before it blocks (0: block at once).
DEFAULT_POLL = 0.003
#: Environment variable that overrides :data:`DEFAULT_POLL` (seconds).
POLL_VARIABLE = "BILEVEL_DIST_POLL"

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A collective operation failed: another rank died, or did not answer in time."""


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel run: ``rank`` of ``world`` processes.

    ``device`` is where collective tensors live (CPU for gloo, the local CUDA device for
    NCCL); ``timeout`` the seconds a collective waits; ``poll`` the seconds it polls for its
    completion before it blocks (:meth:`_complete`)."""

    rank: int
    world: int
    device: torch.device
    timeout: float
    poll: float = 0.0

    # -- ownership -------------------------------------------------------------------------

    def owned(self, index: Tensor) -> Tensor:
        """The entries of ``index`` (sample numbers) that this rank owns: i mod N = rank."""
        return index[index % self.world == self.rank]

    def owned_mask(self, n: int, device: torch.device | None = None) -> Tensor:
        """Boolean mask of length n: True for the samples this rank owns."""
        return torch.arange(n, device=device) % self.world == self.rank

    def block(self, n: int) -> tuple[int, int]:
        """[start, stop): this rank's contiguous block of n rows (sizes differ by ≤ 1)."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def share(self, size: int) -> int:
        """This rank's part of ``size`` draws, split like :meth:`block`."""
        start, stop = self.block(size)
        return stop - start

    # -- collectives ---------------------------------------------------------------------------

    def _complete(self, work: Any) -> None:
        """Wait for the asynchronous collective ``work``: poll its completion for up to
        :attr:`poll` seconds, yielding the processor between polls, then block. SID makes one
        dependent all-reduce per inner iteration, a few milliseconds of work apart; a process
        that blocks at once lets its processor go idle, and waking it for each of them cost
        more than the polling (two processes, 4 SID steps, 8 interleaved pairs of runs on a
        loaded 2-core machine: 7 faster polling; medians 2.24 s against 2.68 s blocking, and
        2.74 s against 3.01 s)."""
        if self.poll > 0:
            end = time.perf_counter() + self.poll
            while not work.is_completed() and time.perf_counter() < end:
                _yield()
        work.wait()

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, ValueError) as err:  # DistBackendError is a RuntimeError
            global _FAILED
            _FAILED = True
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({first}); another process "
                f"has stopped or did not answer within {self.timeout:g} s. The run stops; "
                "resume it from its last checkpoint with --resume"
            ) from err

    def sum(self, t: Tensor) -> Tensor:
        """Σ over ranks of ``t`` (a new tensor; ``t`` is left as it was)."""
        out = t.detach().to(self.device, copy=True).contiguous()
        self._collective(
            "an all-reduce", lambda: self._complete(dist.all_reduce(out, async_op=True))
        )
        return out.to(t.device)

    def combine(self, t: Tensor, n: int) -> Tensor:
        """Σ_r (N_r/n)·t_r, N_r the size of rank r's block of n rows: the mean over all n rows
        of a per-row mean computed on each rank's block (or a minibatch drawn from it)."""
        return self.sum(self._weighted(t, n))

    def _weighted(self, t: Tensor, n: int) -> Tensor:
        """(N_r/n)·t: this rank's term of :meth:`combine`."""
        start, stop = self.block(n)
        return t * ((stop - start) / n)

    def sum_all(
        self, tensors: Sequence[Tensor], meanwhile: Callable[[], None] | None = None
    ) -> list[Tensor]:
        """Σ over ranks of each tensor, in one all-reduce of their concatenation (in their
        common dtype); each result has its tensor's shape, dtype and device. ``meanwhile``
        (work that does not need the result) runs while the all-reduce is in flight."""
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
        flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for t in tensors])
        work = self._collective("an all-reduce", lambda: dist.all_reduce(flat, async_op=True))
        try:
            if meanwhile is not None:
                meanwhile()
        finally:  # the collective completes whatever the work in between did
            self._collective("an all-reduce", lambda: self._complete(work))
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            offset += t.numel()
        return out

    def combine_all(
        self,
        parts: Sequence[tuple[Tensor, int | None]],
        meanwhile: Callable[[], None] | None = None,
    ) -> list[Tensor]:
        """:meth:`combine` of every (t, n) of ``parts`` (n None: the plain sum over ranks), in
        one all-reduce (:meth:`sum_all`): a step's reductions cost one synchronisation."""
        weighted = [t if n is None else self._weighted(t, n) for t, n in parts]
        return self.sum_all(weighted, meanwhile)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Σ over ranks of each number (one all-reduce in float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return [float(v) for v in self.sum(t)]

    def maximum(self, values: Sequence[float]) -> list[float]:
        """The largest over ranks of each number (one all-reduce in float64)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective(
            "an all-reduce",
            lambda: self._complete(dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True)),
        )
        return [float(v) for v in t.cpu()]

    def extreme(self, value: float, largest: bool) -> float:
        """The largest (or smallest) of the ranks' ``value``."""
        (out,) = self.maximum([value if largest else -value])
        return out if largest else -out

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. its clock's decision to stop)."""
        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        self._collective(
            "a broadcast", lambda: self._complete(dist.broadcast(t, src=0, async_op=True))
        )
        return bool(t.item())

    def merge_rows(self, table: Tensor) -> Tensor:
        """The (n, ...) table whose row i is rank (i mod N)'s row i: each rank keeps the rows of
        the samples it owns up to date; the others are ignored."""
        mask = self.owned_mask(table.shape[0], table.device)
        mask = mask.reshape(-1, *[1] * (table.dim() - 1))
        return self.sum(torch.where(mask, table, torch.zeros_like(table)))

    def gather_rows(self, local: Tensor, index: Tensor, n: int) -> Tensor:
        """The (n, ...) tensor whose rows ``index`` are this rank's ``local`` rows (the ranks'
        ``index`` sets partition range(n))."""
        full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[index.to(local.device)] = local
        return self.sum(full)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._collective("a broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        self._collective("an all-gather", lambda: dist.all_gather_object(out, obj))
        return out

    def check(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank's step failed: its own ``error``, or on the others
        the first failing rank's exception type (a :class:`BilevelError` subclass) with its
        message, so that every rank ends the step the same way."""
        (failed,) = self.maximum([1.0 if error is not None else 0.0])
        if failed:
            self.raise_reported(error)

    def raise_reported(self, error: BaseException | None) -> None:
        """Raise the failure of a step that failed on some rank (see :meth:`check`)."""
        reports = self.gather_object(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        rank, (name, message) = next((r, e) for r, e in enumerate(reports) if e is not None)
        import bilevel.problem as problem_module

        cls = getattr(problem_module, name, None)
        if not (isinstance(cls, type) and issubclass(cls, BilevelError)):
            cls = DistributedError
        raise cls(f"rank {rank}: {message}")


_SHARD: Shard | None = None
_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: time.sleep(0))
_FAILED = False  # a collective of this process failed: leave without waiting for the others


def current() -> Shard | None:
    """The shard of this process in a data-parallel run of more than one process, else None."""
    return _SHARD


def is_writer() -> bool:
    """True on the process that writes the run's files: rank 0, or the only process."""
    return _SHARD is None or _SHARD.rank == 0


def _poll(backend: str) -> float:
    """Seconds a collective polls before it blocks: ``$BILEVEL_DIST_POLL``, else
    :data:`DEFAULT_POLL` for gloo and 0 for NCCL (whose collectives complete on the GPU)."""
    text = os.environ.get(POLL_VARIABLE)
    if text is None:
        return DEFAULT_POLL if backend == "gloo" else 0.0
    try:
        poll = float(text)
    except ValueError:
        raise BilevelError(f"{POLL_VARIABLE}={text!r} is not a number of seconds") from None
    if not (math.isfinite(poll) and poll >= 0):
        raise BilevelError(f"{POLL_VARIABLE} must be a non-negative number of seconds, got {poll}")
    return poll


def _timeout(timeout: float | None) -> float:
    if timeout is None:
        text = os.environ.get(TIMEOUT_VARIABLE)
        try:
            timeout = DEFAULT_TIMEOUT if text is None else float(text)
        except ValueError:
            raise BilevelError(f"{TIMEOUT_VARIABLE}={text!r} is not a number of seconds") from None
    if not (math.isfinite(timeout) and timeout > 0):
        raise BilevelError(
            f"the collective timeout must be a positive number of seconds, got {timeout}"
        )
    return float(timeout)


def init_from_env(timeout: float | None = None, backend: str | None = None) -> Shard | None:
    """Join the process group described by torchrun's environment variables and return this
    process's :class:`Shard`; None (nothing done) when ``WORLD_SIZE`` is unset or 1.

    ``backend``: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA is available, else gloo);
    ``timeout``: seconds a collective waits (default ``$BILEVEL_DIST_TIMEOUT`` or
    :data:`DEFAULT_TIMEOUT`); a collective polls for its completion for
    ``$BILEVEL_DIST_POLL`` seconds before it blocks (default :data:`DEFAULT_POLL` with gloo,
    0 with NCCL). Ranks other than 0 print nothing on stdout."""
    global _SHARD
    if _SHARD is not None:
        return _SHARD
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    seconds = _timeout(timeout)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    poll = _poll(backend)
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
        atexit.register(shutdown, wait=False)
    _SHARD = Shard(dist.get_rank(), dist.get_world_size(), device, seconds, poll)
    if _SHARD.rank != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (for the process)
    return _SHARD


def shutdown(wait: bool = True) -> None:
    """Leave the process group (if this module joined one), first meeting the other processes
    at a barrier when ``wait`` (and no collective of this process has failed).

    :func:`init_from_env` registers ``shutdown(wait=False)`` to run at interpreter exit: a
    process group left alive until then is torn down by C++ destructors, which abort the
    process ("terminate called without an active exception", SIGABRT) when a peer has died.
    Destroyed first, the process exits with its own status (1 for the command line's
    :class:`DistributedError`)."""
    global _SHARD
    if _SHARD is not None and dist.is_initialized():
        if wait and not _FAILED:
            with contextlib.suppress(RuntimeError):  # a peer that died: nothing to wait for
                dist.barrier()
        dist.destroy_process_group()
    _SHARD = None


def leave(status: int) -> None:
    """End this process of a data-parallel run with ``status``: meet the other processes at a
    barrier (unless a collective of this process has failed: a peer died), flush the output
    and leave with ``os._exit``. Does nothing in a single-process run.

    Leaving through the interpreter's exit instead lets gloo's C++ destructors run while its
    threads may still be live, which aborts the process ("terminate called without an active
    exception", SIGABRT) even after :func:`shutdown`: 1 of 6 plain two-process ``torchrun``
    runs of ``bilevel hpo`` ended so, after a peer's death or not, and ``torchrun`` then
    reports the whole job as failed. The command line calls this once its job has ended and
    its files are written."""
    if _SHARD is None or not dist.is_initialized():
        return
    if not _FAILED:
        with contextlib.suppress(RuntimeError):  # a peer that died: nothing to wait for
            dist.barrier()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def on_writer(fn: Callable[[], T]) -> T | None:
    """``fn()`` on rank 0 only (everything when not distributed); its exception, if any, is
    raised on every rank (see :meth:`Shard.check`). Returns ``fn()``'s value on rank 0, None on
    the others."""
    shard = _SHARD
    if shard is None:
        return fn()
    value, error = None, None
    if shard.rank == 0:
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 (raised again below, on every rank)
            error = err
    shard.check(error)
    return value


def once(fn: Callable[[], T]) -> T:
    """``fn()`` computed by rank 0 alone, its value broadcast to every rank (``fn()`` itself
    when not distributed): work whose result every rank needs but one rank can do, such as an
    accurate evaluation or a grid search. An exception of rank 0 is raised on every rank."""
    if _SHARD is None:
        return fn()
    return _SHARD.broadcast_object(on_writer(fn))


def reduce_hypergradient(
    hg: Any, count: int, params: list[Tensor], shard: Shard, error: BaseException | None = None
) -> tuple[Any, float]:
    """The hypergradient of the whole minibatch from each rank's estimate ``hg`` on its
    ``count`` instances (``hg`` None when it has none, or when it failed with ``error``): z and
    the loss as count-weighted means, ω = Σ_r (B_r/B) ω_r (None if any rank has none),
    certified only if every rank's is, μ the smallest, oracle counts and wall time summed;
    per-instance fields stay local. Also returns the largest certified distance max_i ε_i.
    Two all-reduces; a failure on any rank is raised on every rank (:meth:`Shard.check`).

    Every rank must call it, with the same parameters, in the same step."""
    from bilevel.autodiff import Cost

    local_mu = math.inf if hg is None or hg.mu is None else float(hg.mu)
    distance = -math.inf if hg is None or count == 0 else float(hg.eps.max())
    failed, neg_mu, distance = shard.maximum([float(error is not None), -local_mu, distance])
    if failed:
        shard.raise_reported(error)
    mu = -neg_mu

    grads = (
        [torch.zeros_like(p) for p in params]
        if hg is None
        else [g.detach().to(p.dtype) for p, g in zip(params, hg.grad)]
    )
    flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.float64) * count
    has_bound = hg is not None and hg.bound is not None
    certified = hg is None or bool(hg.bound_certified)
    cost = Cost() if hg is None else hg.cost
    scalars = torch.tensor(
        [
            count,
            0.0 if hg is None else hg.loss * count,
            (hg.bound * count) if has_bound else 0.0,
            float(hg is None or has_bound),
            float(certified),
            cost.grad_evals,
            cost.hvps,
            cost.vjps,
            cost.wall_time,
        ],
        dtype=torch.float64,
    )
    total = shard.sum(torch.cat([flat.cpu(), scalars]))
    grad_sum, s = total[: flat.numel()], total[flat.numel() :].tolist()
    n = s[0]
    if n <= 0:
        raise BilevelError("the minibatch holds no instance on any rank")
    grad, offset = [], 0
    for p in params:
        grad.append((grad_sum[offset : offset + p.numel()] / n).reshape(p.shape).to(p))
        offset += p.numel()
    every_bound = s[3] == shard.world
    reduced = Cost(s[5], s[6], s[7], s[8])
    if hg is None:
        return _EmptyReduced(grad, s[1] / n, s[2] / n if every_bound else None, reduced), distance
    out = replace(
        hg,
        grad=grad,
        loss=s[1] / n,
        bound=s[2] / n if every_bound else None,
        bound_certified=every_bound and s[4] == shard.world,
        mu=mu if math.isfinite(mu) else hg.mu,
        cost=reduced,
    )
    return out, distance


@dataclass
class _EmptyReduced:
    """The reduced hypergradient on a rank that had no instance in the minibatch."""

    grad: list[Tensor]
    loss: float
    bound: float | None
    cost: Any

    @property
    def norm(self) -> float:
        return math.sqrt(sum(float((g * g).sum()) for g in self.grad))
