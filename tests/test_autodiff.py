"""autodiff.backward: the engine call behind the oracles agrees with torch.autograd.grad."""

from __future__ import annotations

import pytest
import torch

from bilevel.autodiff import backward


def _graph():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    energy = (torch.nn.functional.softplus(x @ a) * theta.exp()).sum(1) + (x**4).sum(1)
    (g,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    return x, theta, unused, energy, g


def test_backward_matches_autograd_grad():
    x, theta, unused, energy, g = _graph()
    v = torch.randn_like(g)
    # Hessian-vector product and mixed product through the kept first-derivative graph
    got = backward(g, (x, theta), v, retain_graph=True)
    want = torch.autograd.grad(g, (x, theta), v, retain_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a scalar output: grad_output None means ones, like torch.autograd.grad
    (got,) = backward(energy.sum(), (x,), retain_graph=True)
    (want,) = torch.autograd.grad(energy.sum(), x, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # create_graph keeps the graph by default (retain_graph follows it)
    (hv_ref,) = torch.autograd.grad(g, x, v, create_graph=True)
    (third_ref,) = torch.autograd.grad((hv_ref * v).sum(), x, retain_graph=True)
    (hv,) = backward(g, (x,), v, create_graph=True)
    (third,) = backward((hv * v).sum(), (x,))
    torch.testing.assert_close(third, third_ref, rtol=0, atol=0)


def test_backward_unused_inputs_and_errors():
    x, theta, unused, energy, g = _graph()
    v = torch.ones_like(g)
    out = backward(g, (theta, unused), v, retain_graph=True, allow_unused=True)
    assert out[1] is None and out[0] is not None
    with pytest.raises(RuntimeError, match="not have been used"):
        backward(g, (theta, unused), v, retain_graph=True)
    # a grad_output of another shape gets autograd's own message, not a wrong product
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        backward(g, (x,), v[:1], retain_graph=True)


def test_backward_tensor_subclass_takes_autograd_grad():
    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.autograd.grad:
                calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(2, 3, dtype=torch.float64).as_subclass(Logged).requires_grad_(True)
    (grad,) = backward((x * x).sum(), (x,))
    assert calls, "a tensor subclass must go through torch.autograd.grad"
    torch.testing.assert_close(
        grad.as_subclass(torch.Tensor), 2 * x.detach().as_subclass(torch.Tensor)
    )


def test_gradient_evaluations_treat_a_tensor_theta_as_a_constant():
    """∇ₓh without a kept graph evaluates h with θ detached (no graph for θ's terms): the
    same energies and gradients; the kept evaluation (Hessian, mixed products) keeps θ."""
    from bilevel import BilevelProblem
    from bilevel.autodiff import LowerLevel

    seen = []

    def h(x, th, _):
        seen.append(th[0].requires_grad)
        return 0.5 * (torch.exp(th[0]) * x * x).sum(1) + (th[1] * x).sum(1)

    theta = [torch.zeros(3, dtype=torch.float64, requires_grad=True)] * 2
    problem = BilevelProblem(h, h, theta, mu=1.0)
    lower = LowerLevel(problem, None)
    x = torch.randn(2, 3, dtype=torch.float64)
    energy, grad = lower.value_and_grad(x)
    kept_energy, kept_grad = lower.value_and_grad(x, keep=True)
    assert seen == [False, True]
    assert torch.equal(energy, kept_energy) and torch.equal(grad, kept_grad)
    assert torch.allclose(grad, x)  # e^0 x + 0
