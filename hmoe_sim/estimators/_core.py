"""Shared pieces of the batched solvers (private).

A *problem* is one data set ``(X_b, y_b, mask_b)`` with its own flattened parameter
vector ``theta_b`` of length ``P``. All functions here act on a stack of problems and never
mix them: every reduction runs over the sample axis or the parameter axis of one problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmoe_sim.models.base import MixtureModel

__all__ = ["Problem", "SolverOutput", "autograd_value_and_jacobian", "gradient_small",
           "normal_equations", "projected_gradient", "risk_and_gradient"]


@dataclass
class Problem:
    """A stack of ``B`` least-squares problems on one device and dtype.

    Attributes
    ----------
    model : MixtureModel
    X : torch.Tensor
        ``(B, n, D)``; rows outside the mask are zero.
    y : torch.Tensor
        ``(B, n)``; entries outside the mask are zero.
    weight : torch.Tensor
        ``(B, n)`` 1.0 where a sample belongs to the data set, 0.0 elsewhere.
    n_eff : torch.Tensor
        ``(B,)`` number of samples of each data set.
    lo, hi : torch.Tensor
        ``(P,)`` box bounds of the flattened parameters.
    """

    model: MixtureModel
    X: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor
    n_eff: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def take(self, index: torch.Tensor | None) -> Problem:
        """The sub-stack ``index`` (``None``: all problems, no copy)."""
        if index is None:
            return self
        return Problem(self.model, self.X[index], self.y[index], self.weight[index], self.n_eff[index],
                       self.lo, self.hi)

    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        """``f_theta(X)``, ``(b, n)`` for ``theta (b, P)``."""
        return self.model.predict(self.model.unflatten(theta), self.X, check=False)

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        """Masked residuals ``w * (y - f_theta(X))``, ``(b, n)``."""
        return self.weight * (self.y - self.predict(theta))

    def residual_and_jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked residuals ``(b, n)`` and the masked Jacobian of ``f`` ``(b, n, P)``.

        Uses the model's analytic ``value_and_jacobian`` when it has one (every model of
        :mod:`hmoe_sim.models`), otherwise :func:`autograd_value_and_jacobian`.
        """
        analytic = getattr(self.model, "value_and_jacobian", None)
        if analytic is not None:
            f, jac = analytic(self.model.unflatten(theta), self.X)
        else:
            f, jac = autograd_value_and_jacobian(self.model, theta, self.X)
        w = self.weight
        if not bool((w == 1).all()):
            jac = jac * w.unsqueeze(-1)
        return w * (self.y - f), jac


def normal_equations(problem: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked residuals ``r`` ``(b, n)``, ``A = J^T J`` ``(b, P, P)`` and ``g = J^T r`` ``(b, P)``.

    ``g`` is formed as ``r^T J`` by ``bmm``: unlike ``J^T r`` (which torch may route to a
    matrix-vector kernel for one problem and a batched one for several), this gives every
    problem bit-identical results whatever the size of the stack it is solved in.
    """
    r, J = problem.residual_and_jacobian(theta)
    return r, J.transpose(-1, -2) @ J, torch.bmm(r.unsqueeze(-2), J).squeeze(-2)


def autograd_value_and_jacobian(model: MixtureModel, theta: torch.Tensor,
                                X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` ``(b, n)`` and its Jacobian ``(b, n, P)`` by reverse mode, for any model.

    One reverse pass through a copy of the parameters *per sample*: ``theta_b`` is
    expanded to ``(b, n, P)``, sample ``i`` is evaluated with its own copy (``X`` as
    ``(b, n, 1, D)``), and the gradient of ``sum_i f_i`` with respect to the copies is
    row ``i`` of the Jacobian, since ``f_i`` depends on copy ``i`` only. This costs a
    few forward passes instead of the ``P`` of forward mode, and no block between
    different problems (or samples) is ever formed.
    """
    b, n = X.shape[:2]
    with torch.enable_grad():
        copies = theta.detach().unsqueeze(-2).expand(b, n, theta.shape[-1]).requires_grad_(True)
        f = model.predict(model.unflatten(copies), X.unsqueeze(-2), check=False).squeeze(-1)
        (jac,) = torch.autograd.grad(f.sum(), copies)
    return f.detach(), jac


def risk_and_gradient(problem: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical risk ``RSS_b / n_b`` ``(b,)`` and its gradient ``(b, P)`` (reverse mode).

    Each problem's risk depends on its own ``theta_b`` only, so the gradient of the sum
    over problems is the stack of the per-problem gradients.
    """
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        risk = problem.residual(th).square().sum(-1) / problem.n_eff
        (grad,) = torch.autograd.grad(risk.sum(), th)
    return risk.detach(), grad


def projected_gradient(grad: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor) -> torch.Tensor:
    """Gradient with the components that push out of the box at an active bound set to zero.

    ``grad`` is the gradient of the objective (a descent step moves along ``-grad``).
    """
    blocked = ((theta <= lo) & (grad > 0)) | ((theta >= hi) & (grad < 0))
    return torch.where(blocked, torch.zeros_like(grad), grad)


def gradient_small(grad: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   risk: torch.Tensor, gtol: float) -> torch.Tensor:
    """The gradient test: ``||projected grad of RSS/n||_inf <= gtol * RSS/n`` (scale free).

    Relative to the risk so that the same ``gtol`` means the same thing for noisy data
    (risk near the noise variance) and noise-free data (risk going to zero, where an
    absolute test would stop while the parameters are still far from the solution).
    """
    return projected_gradient(grad, theta, lo, hi).abs().amax(-1) <= gtol * risk


@dataclass
class SolverOutput:
    """What every solver returns, per problem ``(B,)`` (parameters ``(B, P)``)."""

    theta: torch.Tensor
    n_iter: torch.Tensor
    rel_change: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor

