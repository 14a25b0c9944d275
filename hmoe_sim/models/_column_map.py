"""Where the entries of :meth:`HMoE.column_map <hmoe_sim.models.hmoe.HMoE.column_map>` go (private)."""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["column_map_layout"]


@functools.lru_cache(maxsize=64)
def column_map_layout(n_atoms: int, input_dim: int, code_dim: int, n_gate: int,
                      device: torch.device) -> tuple[tuple[int, int], tuple[torch.Tensor, ...]]:
    """``((P_ns, P), (at_code, at_hyper, at_one))`` of a shared HMoE with ``n_atoms = H L`` atoms.

    ``M = d theta_ns / d theta`` is ``(P_ns, P)``; the positions are flat indices into it of the
    entries ``d gen_kr / d z_kq`` and ``d gen_kr / d W_rq`` in ``(k, r, q)`` order (generated entry
    ``r`` of atom ``k``: ``beta_1`` for ``r < D``, ``a`` for ``D <= r < 2D``, ``b`` for ``r = 2D``;
    ``W`` the stacked ``(W_1; W_2; w_3^T)``), and of the ones of ``beta_0`` and of the ``n_gate``
    head-gate parameters (identities). Rows follow the non-shared order ``beta0 (HL), beta1 (HL x D),
    a (HL x D), b (HL), gate``; columns the shared order ``beta0 (HL), W1 (D x q), W2 (D x q),
    w3 (q), z (HL x q), gate``.
    """
    hl, d, q = n_atoms, input_dim, code_dim
    p_ns, p_s = 2 * hl * (d + 1) + n_gate, hl * (1 + q) + 2 * d * q + q + n_gate
    k, r, c = np.meshgrid(np.arange(hl), np.arange(2 * d + 1), np.arange(q), indexing="ij")
    row = np.where(r < d, hl + k * d + r, np.where(r < 2 * d, hl + hl * d + k * d + (r - d), hl + 2 * hl * d + k))
    at_code = row * p_s + hl + (2 * d + 1) * q + k * q + c
    at_hyper = row * p_s + hl + r * q + c
    ones = [i * p_s + i for i in range(hl)] + [(p_ns - n_gate + j) * p_s + p_s - n_gate + j for j in range(n_gate)]
    as_index = lambda a: torch.as_tensor(np.asarray(a).reshape(-1), dtype=torch.long, device=device)  # noqa: E731
    return (p_ns, p_s), (as_index(at_code), as_index(at_hyper), as_index(ones))
