"""The common contract of every regression model in hmoe-sim.

A model object holds only *structure* (sizes, gate and expert kinds, known frozen
experts). The unknown parameters live in a plain ``dict[str, torch.Tensor]`` -- the
*parameter container* -- whose tensors carry any number of leading batch dimensions
followed by the per-model trailing shape given by :meth:`MixtureModel.param_shapes`.
All tensors of one container share the same batch shape, dtype and device.

Batching rule for ``predict(params, X)``: ``X`` has shape ``(*batch_x, n, D)`` and the
parameters have batch shape ``batch_p``. Either the two batch shapes are equal, or one of
them is empty (one parameter set for many data sets, or many parameter sets for one data
set). Anything else raises: there is no silent broadcasting.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from hmoe_sim._validation import check_finite_tensor, check_float_tensor

__all__ = ["MixingMeasure", "MixtureModel", "Params", "softmax_mix"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MixingMeasure:
    """A (batch of) discrete mixing measure(s) ``G = sum_i w_i delta_{omega_i}``.

    Attributes
    ----------
    weights : torch.Tensor
        ``(*batch, k)`` atom masses ``exp(beta_0i)``.
    atoms : torch.Tensor
        ``(*batch, k, p)`` atom locations ``omega_i = (beta_1i, a_i, b_i)``.
    groups : torch.Tensor or None
        ``(k,)`` long tensor: the head (first-level group) of each atom, or ``None`` for a
        one-level model. Voronoi cells are formed within groups.
    """

    weights: torch.Tensor
    atoms: torch.Tensor
    groups: torch.Tensor | None = None


def softmax_mix(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_j softmax(logits)_j * values_j`` over the last axis, through logsumexp.

    Parameters
    ----------
    logits, values : torch.Tensor
        Gate scores and expert values, broadcastable, mixed over the last axis.

    Returns
    -------
    torch.Tensor
        The mixture, with the last axis reduced.
    """
    log_weights = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return (torch.exp(log_weights) * values).sum(dim=-1)


class MixtureModel(ABC):
    """Base class: parameter bookkeeping, validation and flattening.

    Subclasses implement :meth:`param_shapes`, :meth:`_predict`, :meth:`mixing_measure`,
    :meth:`with_atoms` and :meth:`sample_truth`.
    """

    #: dimension ``D`` of one input ``X``
    input_dim: int

    # ------------------------------------------------------------------ structure
    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Ordered mapping from parameter name to its trailing (unbatched) shape."""

    @property
    @abstractmethod
    def n_atoms(self) -> int:
        """Number of atoms ``k`` of the mixing measure (adapter atoms for an HMoE)."""

    @abstractmethod
    def with_atoms(self, n_atoms: int) -> MixtureModel:
        """Same structure with another number of atoms (for over-specified fits)."""

    @property
    def n_params(self) -> int:
        """Number of free scalars in one parameter set."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ------------------------------------------------------------------ validation
    def batch_shape(self, params: Params, *, check_finite: bool = True) -> torch.Size:
        """Validate a parameter container and return its batch shape.

        Raises
        ------
        ValueError
            Missing or unknown names, a wrong trailing shape, batch shapes that differ
            between tensors, mixed dtypes or devices, or non-finite values.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of tensors, got {type(params).__name__}")
        shapes = self.param_shapes()
        missing = [k for k in shapes if k not in params]
        unknown = [k for k in params if k not in shapes]
        if missing or unknown:
            raise ValueError(
                f"{type(self).__name__} parameters: missing {missing}, unknown {unknown}; "
                f"expected names {list(shapes)}"
            )
        batch: torch.Size | None = None
        ref: torch.Tensor | None = None
        for name, trailing in shapes.items():
            t = check_float_tensor(f"params[{name!r}]", params[name])
            nt = len(trailing)
            if t.dim() < nt or tuple(t.shape[t.dim() - nt :]) != trailing:
                raise ValueError(
                    f"params[{name!r}] has shape {tuple(t.shape)}; expected (*batch, "
                    f"{', '.join(map(str, trailing))}) for {type(self).__name__}"
                )
            b = t.shape[: t.dim() - nt]
            if batch is None:
                batch, ref = b, t
            else:
                assert ref is not None
                if b != batch:
                    raise ValueError(
                        f"params[{name!r}] has batch shape {tuple(b)} but other parameters have "
                        f"{tuple(batch)}; all parameters must share one batch shape"
                    )
                if t.dtype != ref.dtype or t.device != ref.device:
                    raise ValueError(
                        f"params[{name!r}] is {t.dtype} on {t.device} but other parameters are "
                        f"{ref.dtype} on {ref.device}"
                    )
            if check_finite:
                check_finite_tensor(f"params[{name!r}]", t)
        assert batch is not None
        return torch.Size(batch)

    def _check_inputs(self, params: Params, X: torch.Tensor, check_finite: bool) -> torch.Size:
        batch_p = self.batch_shape(params, check_finite=check_finite)
        X = check_float_tensor("X", X)
        if X.dim() < 2 or X.shape[-1] != self.input_dim:
            raise ValueError(
                f"X has shape {tuple(X.shape)}; expected (*batch, n, {self.input_dim})"
            )
        if check_finite:
            check_finite_tensor("X", X)
        any_param = next(iter(params.values()))
        if X.dtype != any_param.dtype or X.device != any_param.device:
            raise ValueError(
                f"X is {X.dtype} on {X.device} but params are {any_param.dtype} on "
                f"{any_param.device}; convert one of them explicitly"
            )
        batch_x = X.shape[:-2]
        if batch_x != batch_p and len(batch_x) and len(batch_p):
            raise ValueError(
                f"X batch shape {tuple(batch_x)} and params batch shape {tuple(batch_p)} differ; "
                "they must be equal, or one of them must be empty"
            )
        return batch_p

    # ------------------------------------------------------------------ evaluation
    def predict(self, params: Params, X: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Regression function ``f_G(X)``.

        Parameters
        ----------
        params : dict of torch.Tensor
            Parameter container with batch shape ``batch_p``.
        X : torch.Tensor
            ``(*batch_x, n, D)`` inputs.
        check : bool, default True
            Validate shapes and finiteness. Estimators pass ``False`` inside their loops.

        Returns
        -------
        torch.Tensor
            ``(*batch, n)`` with ``batch`` the non-empty one of ``batch_x``, ``batch_p``.
        """
        if check:
            self._check_inputs(params, X, check_finite=True)
        return self._predict(params, X)

    @abstractmethod
    def _predict(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        """Evaluate (no checks): parameters ``(*batch_p, *trailing)``, ``X`` ``(*batch_x, n, D)``.

        Implementations contract ``X`` with the parameters by ``einsum`` over ``...`` and
        insert the sample axis (``unsqueeze(-2)`` or similar) before adding per-atom terms.
        """

    @abstractmethod
    def mixing_measure(self, params: Params) -> MixingMeasure:
        """The mixing measure of ``params`` (weights, atom locations, groups)."""

    @abstractmethod
    def sample_truth(self, seed: int | None = None, **scales: float) -> Params:
        """Draw a true parameter set following the sibling papers' recipe (unbatched, float64)."""

    # ------------------------------------------------------------------ flattening
    def flatten(self, params: Params) -> torch.Tensor:
        """Concatenate the parameters into ``(*batch, n_params)`` in ``param_shapes`` order."""
        batch = self.batch_shape(params, check_finite=False)
        return torch.cat([params[k].reshape(*batch, -1) for k in self.param_shapes()], dim=-1)

    def unflatten(self, vector: torch.Tensor) -> Params:
        """Inverse of :meth:`flatten` (views into ``vector``)."""
        vector = check_float_tensor("vector", vector)
        if vector.dim() < 1 or vector.shape[-1] != self.n_params:
            raise ValueError(
                f"vector has shape {tuple(vector.shape)}; expected (*batch, {self.n_params})"
            )
        batch = vector.shape[:-1]
        out: Params = {}
        start = 0
        for name, shape in self.param_shapes().items():
            size = math.prod(shape)
            out[name] = vector[..., start : start + size].reshape(*batch, *shape)
            start += size
        return out

    def cast(self, params: Params, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> Params:
        """Move/convert every tensor of a container (returns a new dict)."""
        return {k: v.to(device=device, dtype=dtype) for k, v in params.items()}


def dict_repr(model: MixtureModel, **fields: object) -> str:
    """``Name(field=value, ...)`` for model reprs."""
    body = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{type(model).__name__}({body})"
