"""Derivatives of the lower-level energy and the upper-level loss, with oracle counting.

All products are matrix free and batched over instances:

* gradient        ∇ₓh_i(x_i)                 (one *gradient evaluation* per instance)
* Hessian-vector  ∇²ₓₓh_i(x_i) v_i           (one *HVP* per instance; double backward)
* mixed VJP       J_iᵀ q_i = ∇_θ⟨∇ₓh_i, q_i⟩  (one *VJP*; summed over instances, θ is shared)

Costs are counted per instance: an evaluation on a batch of ``b`` active instances counts
``b``. This makes costs comparable across batch sizes ("lower-level + CG iterations").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from bilevel.linear import instance_index
from bilevel.problem import (
    Batch,
    BilevelError,
    BilevelProblem,
    NonFiniteError,
    _checked,
    index_batch,
)

try:  # the engine entry point behind torch.autograd.grad
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - other torch versions
    _engine_run_backward = None


@dataclass
class Cost:
    """Oracle calls spent, counted per instance, and wall time in seconds.

    A stochastic oracle on a minibatch of b out of N samples counts b/N of a call.
    ``bound_products`` are the Jacobian products spent on an error bound's constants (also
    counted in ``vjps``): each is a backward pass through the gradient graph like an HVP, so
    they count as oracle calls.
    """

    grad_evals: float = 0
    hvps: float = 0
    vjps: float = 0
    wall_time: float = 0.0
    bound_products: float = 0

    @property
    def oracle_calls(self) -> float:
        """Lower-level gradient evaluations + Hessian-vector products (the papers' x-axis),
        plus the products spent on error bounds."""
        return self.grad_evals + self.hvps + self.bound_products

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.grad_evals + other.grad_evals,
            self.hvps + other.hvps,
            self.vjps + other.vjps,
            self.wall_time + other.wall_time,
            self.bound_products + other.bound_products,
        )


def nonfinite_gradient() -> NonFiniteError:
    """The error for a NaN or infinite lower-level gradient."""
    return NonFiniteError(
        "the lower-level gradient became NaN or infinite; the iterates diverged "
        "(step size too large for the energy's curvature, or non-finite data)"
    )


def backward(
    output: Tensor,
    inputs: tuple[Tensor, ...],
    grad_output: Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> tuple[Tensor | None, ...]:
    """∂⟨grad_output, output⟩/∂inputs by one backward pass (``grad_output`` None: ones, for a
    scalar output): ``torch.autograd.grad`` without its Python argument handling.

    That handling (argument normalisation, dispatch for tensor subclasses, the shape check of
    ``grad_output``) costs about 45 µs per call on the CPU, a third of a Hessian-vector
    product at d = 30; here the shape check is one comparison, and tensors with a
    ``__torch_function__`` override, a ``grad_output`` of another shape (for autograd's own
    error) and torch versions without the engine entry point go through
    ``torch.autograd.grad``.
    """
    if grad_output is None:
        grad_output = torch.ones_like(output)
    if retain_graph is None:  # as torch.autograd.grad
        retain_graph = create_graph
    if (
        _engine_run_backward is None
        or grad_output.shape != output.shape
        or has_torch_function((output, grad_output, *inputs))
    ):
        return torch.autograd.grad(
            output,
            inputs,
            grad_output,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=allow_unused,
        )
    return _engine_run_backward(
        (output,),
        (grad_output,),
        retain_graph,
        create_graph,
        inputs,
        allow_unused,
        accumulate_grad=False,
    )


def _detached(theta: Any) -> Any:
    """θ with its tensors detached when it is a tensor or a plain list, tuple or dict of
    them (the same container type); anything else (a module, other containers) unchanged."""
    if isinstance(theta, Tensor):
        return theta.detach()
    if type(theta) is dict:
        return {k: _detached(v) for k, v in theta.items()}
    if type(theta) in (list, tuple):
        return type(theta)(_detached(v) for v in theta)
    return theta


def batch_norm(v: Tensor) -> Tensor:
    """Per-instance Euclidean norm of a (B, ...) tensor, shape (B,)."""
    return torch.linalg.vector_norm(v if v.dim() == 2 else v.reshape(v.shape[0], -1), dim=1)


def batch_dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-instance inner product of two (B, ...) tensors, shape (B,)."""
    return (u.reshape(u.shape[0], -1) * v.reshape(v.shape[0], -1)).sum(dim=1)


def expand_as_batch(s: Tensor, like: Tensor) -> Tensor:
    """Reshape per-instance scalars (B,) so they broadcast against ``like`` (B, ...)."""
    return s.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass
class LowerLevel:
    """The lower-level energy h(·, θ, batch) at fixed θ and batch, as counted oracles.

    ``index`` arguments select instances (rows of the full batch) so that converged instances
    need not be evaluated.
    """

    problem: BilevelProblem
    batch: Batch
    cost: Cost = field(default_factory=Cost)
    _selected: tuple[Tensor | None, Batch] = field(default=(None, None), init=False, repr=False)
    _graph: list | None = field(default=None, init=False, repr=False)
    _constant: Any = field(default=None, init=False, repr=False)

    def select(self, index: Tensor | None) -> Batch:
        """``batch`` restricted to ``index`` (the last selection is kept: solvers pass the same
        ``index`` tensor until their active set changes, and must not modify it in place)."""
        if index is None:
            return self.batch
        last, selected = self._selected
        if index is not last:
            selected = index_batch(self.batch, index)
            self._selected = (index, selected)
        return selected

    def value_and_grad(
        self, x: Tensor, index: Tensor | None = None, check: bool = True, keep: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Energies h_i(x_i) (b,) and gradients ∇ₓh_i(x_i) (b, ...), detached.

        ``check=False`` skips the finiteness test of the gradient (a host synchronisation);
        the caller then tests the gradient norms it computes anyway. ``keep=True`` (a lower
        solver's evaluation at its starting point, all instances) keeps the first-derivative
        graph until the next evaluation: if the solver returns that point
        (:meth:`returns_kept`), :meth:`hessian` there reuses it instead of evaluating again.
        """
        self._graph = None
        if torch.is_grad_enabled():
            energy, grad = self._value_and_grad(x, index, keep)
        else:
            with torch.enable_grad():
                energy, grad = self._value_and_grad(x, index, keep)
        self.cost.grad_evals += x.shape[0]
        if check and not bool(torch.isfinite(grad).all()):
            raise nonfinite_gradient()
        return energy.detach(), (grad.detach() if keep else grad)

    def _value_and_grad(self, x: Tensor, index: Tensor | None, keep: bool) -> tuple[Tensor, Tensor]:
        xr = x.detach().requires_grad_(True)
        if keep:  # the graph is kept for the Hessian and the mixed products: θ in it
            energy = self.problem.energy(xr, self.select(index))
        else:  # ∇ₓh only: θ as a constant, so that no graph is recorded for its terms
            value = self.problem.lower_energy(xr, self._theta_constant(), self.select(index))
            energy = _checked("lower_energy", value, x.shape[0])
        (grad,) = backward(energy.sum(), (xr,), create_graph=keep)
        if keep and index is None:
            self._graph = [None, xr, grad]
        return energy, grad

    def _theta_constant(self) -> Any:
        """θ detached (sharing its storage) when it is a tensor or a sequence or dict of
        tensors; an ``nn.Module`` as it is (its parameters cannot be swapped for constants)."""
        if self._constant is None:
            self._constant = _detached(self.problem.theta)
        return self._constant

    def returns_kept(self, x: Tensor) -> None:
        """Declare that ``x`` (a copy) is the point of the kept graph (see ``value_and_grad``)."""
        if self._graph is not None:
            self._graph[0] = x

    def hessian(self, x: Tensor, index: Tensor | None = None) -> HessianOperator:
        """The Hessian ∇²ₓₓh at ``x`` as a batched matrix-free operator (keeps the graph)."""
        graph, self._graph = self._graph, None
        if graph is not None and graph[0] is x and index is None:
            return HessianOperator(self, x, graph=(graph[1], graph[2]))
        return HessianOperator(self, x, index)


class HessianOperator:
    """Matrix-free ∇²ₓₓh(x) and mixed products at a fixed point x (one graph, reused).

    The first-derivative graph g(x, θ) = ∇ₓh(x, θ) is built once with ``create_graph=True``;
    every Hessian-vector product and every mixed product Jᵀq is one backward pass through it.
    When a linear solver has retired more than half of the instances, the graph is rebuilt
    on the remaining ones so that converged instances stop costing products.
    """

    def __init__(
        self,
        lower: LowerLevel,
        x: Tensor,
        index: Tensor | None = None,
        graph: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """``graph``: (x with gradients, ∇ₓh with its graph) already evaluated at ``x`` for
        all instances (the lower solver's last evaluation), used instead of a new one."""
        self.lower = lower
        self.x_full = x.detach() if x.requires_grad else x
        n = x.shape[0]
        self.full_index = instance_index(n, x.device) if index is None else index.to(x.device)
        self._cost = lower.cost
        if graph is None:
            self._build(self.full_index, self.x_full)
        else:
            self._set(self.full_index, *graph)
        self._full = (self._index, self._x, self._g)

    def _build(self, index: Tensor, x: Tensor) -> None:
        lower = self.lower
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            energy = lower.problem.energy(xr, index_batch(lower.batch, index))
            (g,) = backward(energy.sum(), (xr,), create_graph=True)
        lower.cost.grad_evals += x.shape[0]
        self._set(index, xr, g)

    def _set(self, index: Tensor, x: Tensor, g: Tensor) -> None:
        """The current graph: ∇ₓh ``g`` of the instances ``index`` at the leaf ``x``; its
        shape, and whether a product may go to autograd's engine directly (plain tensors)."""
        self._index, self._x, self._g = index, x, g
        self._known: Tensor | None = index
        self._shape, self._rows = g.shape, g.shape[0]
        self._direct = _engine_run_backward is not None and type(g) is Tensor

    @property
    def gradient(self) -> Tensor:
        """∇ₓh at the operator's point, all instances (detached)."""
        return self._full[2].detach()

    def matvec(self, v: Tensor, index: Tensor) -> Tensor:
        """H_index v for the instances ``index`` (positions in the full batch).

        An ``index`` object seen before on the current graph is trusted without comparing its
        values (solvers pass the same tensor between changes of their active set), so the
        product costs no host synchronisation; it then goes to autograd's engine directly (a
        Krylov solver's inner loop: no further argument handling, see :func:`backward`).
        """
        if index is self._known and self._direct and type(v) is Tensor and v.shape == self._shape:
            self._cost.hvps += self._rows
            return _engine_run_backward(
                (self._g,), (v,), True, False, (self._x,), False, accumulate_grad=False
            )[0]
        if index is not self._known:
            if index.numel() != self._index.numel() or not bool((index == self._index).all()):
                if 2 * index.numel() <= self._index.numel():
                    pos = _positions(self.full_index, index)
                    self._build(index, self.x_full[pos])
                else:
                    pos = _positions(self._index, index)
                    padded = torch.zeros_like(self._x)
                    padded[pos] = v
                    return self._hvp(padded)[pos]
            self._known = index
        return self._hvp(v)

    def _hvp(self, v: Tensor) -> Tensor:
        (hv,) = backward(self._g, (self._x,), v, retain_graph=True)
        self.lower.cost.hvps += v.shape[0]
        return hv

    def full_matvec(self, v: Tensor) -> Tensor:
        """H v for all instances, on the full graph."""
        self._set(*self._full)
        self._known = None
        return self._hvp(v)

    def jacobian_vjp(self, q: Tensor, params: list[Tensor]) -> list[Tensor]:
        """Σ_i J_iᵀ q_i = ∇_θ⟨∇ₓh(x, θ), q⟩ with J = ∇²_θx h, q held fixed."""
        g = self._full[2]
        with torch.enable_grad():
            out = backward(g, tuple(params), q, retain_graph=True, allow_unused=True)
        self.lower.cost.vjps += q.shape[0]
        return [torch.zeros_like(p) if o is None else o for p, o in zip(params, out)]

    def jacobian_jvp(self, u: list[Tensor], params: list[Tensor]) -> Tensor:
        """J u = (∂/∂t) ∇ₓh(x, θ + t u) for all instances (double-backward trick)."""
        g = self._full[2]
        with torch.enable_grad():
            w = torch.zeros_like(g, requires_grad=True)
            jt_w = torch.autograd.grad(g, params, w, create_graph=True, allow_unused=True)
            pairs = [(o, ui) for o, ui in zip(jt_w, u) if o is not None]
            if not pairs:
                return torch.zeros_like(g)
            (ju,) = torch.autograd.grad(
                [o for o, _ in pairs], w, [ui for _, ui in pairs], retain_graph=True
            )
        self.lower.cost.vjps += 2 * g.shape[0]
        return ju


def _positions(haystack: Tensor, needles: Tensor) -> Tensor:
    """Positions of ``needles`` inside the sorted index tensor ``haystack``."""
    return torch.searchsorted(haystack, needles)


def upper_gradients(
    problem: BilevelProblem, x: Tensor, batch: Batch
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Upper-level losses f_i (B,), per-instance ∇ₓf_i (B, ...), and ∇_θ mean_i f_i."""
    params = problem.params
    losses, grad_x, sums = upper_gradient_sums(problem, x, batch, params)
    n = x.shape[0]
    grad_theta = [torch.zeros_like(p) if g is None else g / n for p, g in zip(params, sums)]
    return losses, grad_x, grad_theta


def upper_gradient_sums(
    problem: BilevelProblem, x: Tensor, batch: Batch, params: list[Tensor]
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Upper-level losses f_i (B,), per-instance ∇ₓf_i (B, ...), and ∇_θ Σ_i f_i for each of
    ``params`` (None where f does not depend on it): one backward pass."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        losses = problem.loss(xr, batch)
        grads: tuple = (None,)
        if losses.requires_grad:
            grads = backward(losses.sum(), (xr, *params), allow_unused=True)
    if grads[0] is None:
        raise BilevelError(
            "upper_loss does not depend on x through autograd (was x detached, or the loss "
            "computed outside torch?): the upper loss must be differentiable in x"
        )
    return losses.detach(), grads[0], list(grads[1:])
