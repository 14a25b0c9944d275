"""The LM's step options and its statistical stopping rule (private).

:class:`LMScheme` says how :func:`~hmoe_sim.estimators._lm.solve_lm` steps (Nielsen's damping update or
delayed gratification, with or without geodesic acceleration, More's or Marquardt's scaling) and when it
stops beside the strict tests (:func:`resolution_test`); :data:`DEFAULT_SCHEME` is what every fit that
names none uses. paper_notes/03 ("An LM for sloppy problems") has the comparison behind the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hmoe_sim.estimators._core import Problem, rows_where, take_rows

__all__ = ["DEFAULT_SCHEME", "RESOLUTION_FRACTION", "LMScheme", "default_scheme", "geodesic_acceleration",
           "resolution_test"]

#: a fit is at the data's resolution when the Gauss-Newton model's decrease over unit moves is below
#: about this fraction of the near-optimal margin (:func:`resolution_test`)
RESOLUTION_FRACTION = 1e-3


@dataclass(frozen=True)
class LMScheme:
    """How the LM steps and when it stops beside the strict tests.

    Attributes
    ----------
    damping_update : {"delayed", "nielsen"}
        ``delayed``: delayed gratification (Transtrum and Sethna 2012): the damping is divided
        by 3 after an accepted step and doubled after a rejected one. ``nielsen``: Nielsen's update
        (``lambda * max(1/3, 1 - (2 rho - 1)^3)`` after an accepted step, ``lambda * nu`` with ``nu``
        doubling after each rejection in a row).
    geodesic : bool
        Geodesic acceleration (Transtrum and Sethna 2012; :func:`geodesic_acceleration`): the step is
        ``v + a / 2`` with ``v`` the LM step and ``a`` the second-order correction along it; a step with
        ``2 ||a|| / ||v|| > accel_ratio`` (scaled norms) is rejected.
    accel_ratio : float
        The largest ``2 ||a|| / ||v||`` accepted (0.75, Transtrum and Sethna's default).
    fd_step : float
        ``h`` of the central difference of the second directional derivative, relative to ``v``.
    resolution : float
        :data:`RESOLUTION_FRACTION` of the :func:`resolution_test`; ``0`` switches the test off
        (only the strict tests converge).
    scaling : {"max", "current"}
        The damping's diagonal ``D``: the running maximum of ``diag(J^T J)`` (More's scaling, which
        keeps parameters from evaporating along flat directions) or its current value (Marquardt's).
    """

    damping_update: str = "nielsen"
    geodesic: bool = False
    accel_ratio: float = 0.75
    fd_step: float = 0.1
    resolution: float = RESOLUTION_FRACTION
    scaling: str = "max"

    def __post_init__(self) -> None:
        if self.damping_update not in ("delayed", "nielsen"):
            raise ValueError(f"damping_update must be 'delayed' or 'nielsen', got {self.damping_update!r}")
        if self.scaling not in ("max", "current"):
            raise ValueError(f"scaling must be 'max' or 'current', got {self.scaling!r}")
        for name in ("accel_ratio", "fd_step", "resolution"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (name == "fd_step" and value == 0):
                raise ValueError(f"LMScheme.{name} must be finite and > 0 (resolution >= 0), got {value!r}")


#: the scheme of every LM fit that names none (read when :func:`~hmoe_sim.estimators._lm.solve_lm` starts)
DEFAULT_SCHEME = LMScheme()


def default_scheme() -> LMScheme:
    """:data:`DEFAULT_SCHEME` as it is now (a caller that replaced it gets the replacement)."""
    return DEFAULT_SCHEME


def geodesic_acceleration(problem: Problem, theta: torch.Tensor, velocity: torch.Tensor, chol: torch.Tensor,
                          free: torch.Tensor | None, fd_step: float) -> torch.Tensor:
    """The geodesic acceleration ``a`` of the LM step ``velocity`` (Transtrum and Sethna 2012).

    With ``f_vv`` the second directional derivative of the model along ``v`` (central differences,
    ``(f(theta + h v) - 2 f(theta) + f(theta - h v)) / h^2``), ``a`` minimises
    ``||w (J a + f_vv)||^2 + lambda a^T D a``: ``a = -(J^T J + lambda D)^{-1} J^T w f_vv``, solved with the
    Cholesky factor ``chol`` of the damped matrix of the step (frozen coordinates: ``free`` False, their
    entries of ``a`` zero). ``J^T u`` is one reverse pass through the model. The step ``v + a / 2``
    follows the curved valley of a sloppy problem to second order.

    Returns
    -------
    torch.Tensor
        ``(b, P)``; a problem with a zero step gets a zero acceleration.
    """
    with torch.enable_grad():
        tracked = theta.detach().requires_grad_(True)
        f = problem.predict(tracked)
    with torch.no_grad():
        h = fd_step
        fvv = (problem.predict(theta + h * velocity) - 2 * f.detach() + problem.predict(theta - h * velocity)) / h**2
        if not problem.unmasked:
            fvv = problem.weight * fvv
    (jtu,) = torch.autograd.grad(f, tracked, grad_outputs=fvv)
    if free is not None:
        jtu = torch.where(free, jtu, 0.0)
    accel = -torch.cholesky_solve(jtu.unsqueeze(-1), chol).squeeze(-1)
    return torch.where((velocity != 0).any(-1, keepdim=True), accel, 0.0)


def resolution_test(A: torch.Tensor, g: torch.Tensor, theta: torch.Tensor, cost: torch.Tensor, n_eff: torch.Tensor,
                    lo: torch.Tensor, hi: torch.Tensor, fraction: float) -> torch.Tensor:
    """No move of length one lowers the cost by more than about ``fraction`` of the near-optimal margin,
    to the Gauss-Newton model at ``theta`` (``A = J^T J``, ``g = J^T r``, ``cost = RSS / 2``, per problem).

    The near-optimal margin (a log-likelihood difference of 1/2, ``(2 * 0.5 / n) * risk`` in risk) is
    ``cost / n`` in cost. Both of these must hold, with ``m = fraction * cost / n``:

    * the projected gradient (coordinates at a bound that would leave the box dropped) has
      ``||g||_2 <= m``: along any unit move the cost falls by at most ``m`` to first order;
    * the model's decrease at the Levenberg-Marquardt step of damping ``mu = sqrt(eps) * max diag A``,
      ``d^T g - d^T A d / 2`` with ``(A + mu I) d = g`` (free coordinates), is at most ``m``.

    Together they bound the model's decrease over the unit ball by ``(4/3 + 1) m``: directions of
    curvature at least ``mu`` keep at least 3/4 of their undamped decrease in the second, the flatter
    ones gain at most ``||g||`` per unit move (first). A problem whose damped matrix is not positive
    definite, or with non-finite numbers, fails the test.
    """
    margin = fraction * cost / n_eff
    free = ~(((theta <= lo) & (g < 0)) | ((theta >= hi) & (g > 0)))
    gf = torch.where(free, g, 0.0)
    passed = torch.isfinite(margin) & (gf.norm(dim=-1) <= margin)
    which = rows_where(passed)
    if which is not None and not which.numel():
        return passed
    A_c, g_c, free_c = take_rows(which, A), take_rows(which, gf), take_rows(which, free)
    mu = math.sqrt(torch.finfo(A.dtype).eps) * torch.diagonal(A_c, dim1=-2, dim2=-1).amax(-1)
    mu = mu.clamp_min(torch.finfo(A.dtype).tiny)
    ff = free_c.unsqueeze(-1) & free_c.unsqueeze(-2)
    A_free = torch.where(ff, A_c, 0.0)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    chol, info = torch.linalg.cholesky_ex(A_free + eye * torch.where(free_c, mu.unsqueeze(-1), 1.0).unsqueeze(-1))
    d = torch.cholesky_solve(g_c.unsqueeze(-1), chol).squeeze(-1)
    quadratic = torch.bmm(torch.bmm(d.unsqueeze(-2), A_free), d.unsqueeze(-1)).reshape(-1)
    predicted = (d * g_c).sum(-1) - 0.5 * quadratic
    small = (info == 0) & torch.isfinite(predicted) & (predicted <= take_rows(which, margin))
    if which is None:
        return passed & small
    result = torch.zeros_like(passed)
    result[which] = small
    return result


