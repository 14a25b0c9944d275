"""Box bounds: the compact parameter set ``Theta`` the theory assumes.

Over-specified least squares on an unbounded parameter space can diverge (a softmax fit
was seen to reach ``beta_0 ~ 400``; theory.md section 7). Every estimator therefore works
on a box ``lo <= theta <= hi`` given per parameter *name* and enforced by projection
(clipping) after every step; fits that end within a tolerance of the box are flagged.

Default box (every name, both structures and both model families): ``[-10, 10]``.
With inputs in ``[-1, 1]^D`` and atoms of scale ``1/sqrt(D)`` (the sibling papers'
recipe) this is far from the truth, so a fit that reaches it has run off, which the
``on_boundary`` flag reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from hmoe_sim.models.base import MixtureModel, Params

__all__ = ["Bounds", "DEFAULT_BOUND"]

#: default half-width of the box for every parameter name
DEFAULT_BOUND = 10.0


class Bounds:
    """Box bounds per parameter name.

    Parameters
    ----------
    limits : mapping of str to (float, float), optional
        ``name -> (low, high)`` replacing the default for that name. Use ``-inf``/``inf``
        to leave a side open.
    default : (float, float)
        Box for every name not in ``limits`` (default ``(-10, 10)``).
    boundary_tol : float
        A coordinate within ``boundary_tol * (1 + |bound|)`` of a finite bound counts as
        on the boundary.

    Examples
    --------
    >>> Bounds({"beta0": (-5.0, 5.0)}).limits_for("beta0")
    (-5.0, 5.0)
    """

    def __init__(
        self,
        limits: Mapping[str, tuple[float, float]] | None = None,
        *,
        default: tuple[float, float] = (-DEFAULT_BOUND, DEFAULT_BOUND),
        boundary_tol: float = 1e-6,
    ) -> None:
        self.default = self._check_pair("default", default)
        self.limits = {str(k): self._check_pair(str(k), v) for k, v in dict(limits or {}).items()}
        if not (isinstance(boundary_tol, int | float) and 0 <= boundary_tol < 1):
            raise ValueError(f"boundary_tol must be a number in [0, 1), got {boundary_tol!r}")
        self.boundary_tol = float(boundary_tol)

    @staticmethod
    def _check_pair(name: str, pair: object) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in pair)  # type: ignore[union-attr]
        except (TypeError, ValueError) as err:
            raise ValueError(f"bounds for {name!r} must be a pair (low, high), got {pair!r}") from err
        if math.isnan(lo) or math.isnan(hi) or not lo < hi:
            raise ValueError(f"bounds for {name!r} must satisfy low < high, got {pair!r}")
        return lo, hi

    def __repr__(self) -> str:
        return f"Bounds({self.limits!r}, default={self.default!r})"

    @classmethod
    def unbounded(cls) -> Bounds:
        """No bounds at all (``(-inf, inf)`` for every name)."""
        return cls(default=(-math.inf, math.inf))

    def limits_for(self, name: str) -> tuple[float, float]:
        """``(low, high)`` of parameter ``name``."""
        return self.limits.get(name, self.default)

    def check_names(self, model: MixtureModel) -> None:
        """Raise if ``limits`` names a parameter the model does not have."""
        unknown = sorted(set(self.limits) - set(model.param_shapes()))
        if unknown:
            raise ValueError(f"bounds name unknown parameter(s) {unknown}; {type(model).__name__} has "
                             f"{list(model.param_shapes())}")

    def vectors(self, model: MixtureModel, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened ``(lo, hi)``, each ``(n_params,)``, in ``model.flatten`` order."""
        self.check_names(model)
        lo, hi = [], []
        for name, shape in model.param_shapes().items():
            low, high = self.limits_for(name)
            size = math.prod(shape)
            lo.append(torch.full((size,), low, dtype=dtype, device=device))
            hi.append(torch.full((size,), high, dtype=dtype, device=device))
        return torch.cat(lo), torch.cat(hi)

    def project(self, model: MixtureModel, params: Params) -> Params:
        """Clip every parameter into its box (returns a new container)."""
        self.check_names(model)
        out = {}
        for name, value in params.items():
            low, high = self.limits_for(name)
            out[name] = value.clamp(min=low, max=high)
        return out

    def contains(self, model: MixtureModel, params: Params) -> torch.Tensor:
        """``(*batch,)`` bool: every coordinate inside the box."""
        lo, hi = self.vectors(model, dtype=_dtype(params), device=_device(params))
        theta = model.flatten(params)
        return ((theta >= lo) & (theta <= hi)).all(dim=-1)

    def at_bounds(self, theta: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per coordinate of ``theta`` ``(*batch, P)``: within tolerance of ``lo``, of ``hi``.

        A coordinate is at a finite bound ``c`` when it lies within ``boundary_tol * (1 + |c|)``
        of it (or beyond); an infinite bound is never reached.
        """
        at_lo = theta <= lo + self.boundary_tol * (1 + lo.abs())
        at_hi = theta >= hi - self.boundary_tol * (1 + hi.abs())
        return at_lo & torch.isfinite(lo), at_hi & torch.isfinite(hi)

    def near_boundary(self, theta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``(*batch,)`` bool from flattened parameters ``(*batch, P)``: any coordinate at a bound."""
        at_lo, at_hi = self.at_bounds(theta, lo, hi)
        return (at_lo | at_hi).any(dim=-1)

    def boundary_params(self, model: MixtureModel, theta: torch.Tensor, lo: torch.Tensor,
                        hi: torch.Tensor) -> list[list[str]]:
        """Per fit (rows of ``theta`` ``(B, P)``): the parameter tensors with an entry at a bound.

        Labels are ``"name:lo"`` / ``"name:hi"`` (e.g. ``"beta0:lo"``: some atom's mass pushed
        to ``exp(lo)``; ``"W1:hi"``), sorted; an empty list for a fit inside the box. A fit has a
        label exactly when :meth:`near_boundary` flags it.
        """
        at_lo, at_hi = self.at_bounds(theta, lo, hi)
        names, hits, start = [], [], 0
        for name, shape in model.param_shapes().items():
            stop = start + math.prod(shape)
            hits += [at_lo[..., start:stop].any(-1), at_hi[..., start:stop].any(-1)]
            names += [f"{name}:lo", f"{name}:hi"]
            start = stop
        table = torch.stack(hits, dim=-1).cpu().tolist()
        return [sorted(label for label, hit in zip(names, row, strict=True) if hit) for row in table]

    def on_boundary(self, model: MixtureModel, params: Params) -> torch.Tensor:
        """``(*batch,)`` bool: some coordinate of the fit lies within tolerance of a bound."""
        lo, hi = self.vectors(model, dtype=_dtype(params), device=_device(params))
        return self.near_boundary(model.flatten(params), lo, hi)


def _dtype(params: Params) -> torch.dtype:
    return next(iter(params.values())).dtype


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device
