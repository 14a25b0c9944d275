"""The HMoE regression function and its exact Jacobian in NumPy, for the benchmark's strong anchor.

Written from the formulation (``paper_notes/02_formulation.md``), not from the torch code: what a
careful user would hand to ``scipy.optimize.least_squares``. Head ``h`` mixes ``N`` known experts
(score ``x_1^T W^Q_h (W^K_h)^T x_j / sqrt(d_k)``, value ``c_h^T (W^V_h)^T x_j``) and ``L`` adapter
atoms (logit ``beta_1hl^T X + beta_0hl``, value ``a_hl^T X + b_hl``) by a softmax; the heads are
combined with weights ``pi_h`` (uniform, or a softmax gate with head 0 as reference). Shared
structure: ``beta_1 = s(W_1 z)``, ``a = s(W_2 z)``, ``b = s(w_3^T z)``. The parameter vector is
in the torch model's ``flatten`` order (checked against it in ``tests/test_bench_numpy_hmoe.py``).
The known experts do not depend on the parameters and are formed once in the constructor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HMoESpec:
    """Structure and frozen weights: ``query, key (H, d, d_k)``, ``value (H, d, d_v)``,
    ``readout (H, d_v)``; ``n_tokens``, adapters per head, structure, code size and map, first level."""

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    readout: np.ndarray
    n_tokens: int
    n_adapters: int
    structure: str
    code_dim: int
    code_activation: str
    first_level: str

    @classmethod
    def of(cls, model) -> HMoESpec:
        """The spec of a torch ``HMoE`` (its weights as NumPy arrays; nothing else is read)."""
        att = model.attention
        return cls(att.query.numpy(), att.key.numpy(), att.value.numpy(), att.readout.numpy(), model.n_tokens,
                   model.n_adapters, model.structure, model.code_dim, model.code_activation, model.first_level)


class HMoEResidual:
    """``f(theta; X) - y`` and its Jacobian ``(n, P)`` for one data set; the last point's
    intermediate values are kept (``least_squares`` asks for the Jacobian where it has just
    evaluated the residual)."""

    def __init__(self, spec: HMoESpec, X: np.ndarray, y: np.ndarray) -> None:
        self.spec, self.X, self.y = spec, X, y
        H, d, dk = spec.query.shape
        tokens = X.reshape(X.shape[0], spec.n_tokens, d)
        q1 = np.einsum("nd,hdk->nhk", tokens[:, 0], spec.query)
        keys = np.einsum("ntd,hdk->nhtk", tokens, spec.key)
        self.known_scores = np.einsum("nhk,nhtk->nht", q1, keys) / math.sqrt(dk)       # (n, H, N)
        self.known_values = np.einsum("ntd,hdv,hv->nht", tokens, spec.value, spec.readout)
        self.H, self.L, self.D, self.q = H, spec.n_adapters, X.shape[1], spec.code_dim
        self._last: tuple[bytes, dict[str, np.ndarray]] | None = None

    def head(self, m: int) -> HMoEResidual:
        """The same problem on the first ``m`` samples."""
        return HMoEResidual(self.spec, self.X[:m], self.y[:m])

    def _unpack(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        H, L, D, q = self.H, self.L, self.D, self.q
        if self.spec.structure == "nonshared":
            shapes = [("beta0", (H, L)), ("beta1", (H, L, D)), ("a", (H, L, D)), ("b", (H, L))]
        else:
            shapes = [("beta0", (H, L)), ("W1", (D, q)), ("W2", (D, q)), ("w3", (q,)), ("z", (H, L, q))]
        if self.spec.first_level == "softmax":
            shapes += [("gate0", (H - 1,)), ("gate1", (H - 1, D))]
        total = sum(math.prod(shape) for _, shape in shapes)
        if theta.size != total:
            raise ValueError(f"theta has {theta.size} entries; this HMoE has {total}")
        out, start = {}, 0
        for name, shape in shapes:
            size = math.prod(shape)
            out[name] = theta[start : start + size].reshape(shape)
            start += size
        return out

    def _act(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``s(u)`` and ``s'(u)``."""
        if self.spec.code_activation == "identity":
            return u, np.ones_like(u)
        t = np.tanh(u)
        return t, 1 - t * t

    def _parts(self, theta: np.ndarray) -> dict[str, np.ndarray]:
        key = theta.tobytes()
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        X, p = self.X, self._unpack(theta)
        if self.spec.structure == "shared":
            (beta1, t1), (a, t2) = (self._act(np.einsum("hlq,dq->hld", p["z"], W)) for W in (p["W1"], p["W2"]))
            b, t3 = self._act(p["z"] @ p["w3"])
            p.update(beta1=beta1, a=a, b=b, t1=t1, t2=t2, t3=t3)
        logits = np.einsum("nd,hld->nhl", X, p["beta1"]) + p["beta0"]
        values = np.einsum("nd,hld->nhl", X, p["a"]) + p["b"]
        all_logits = np.concatenate([self.known_scores, logits], axis=2)
        w = np.exp(all_logits - all_logits.max(axis=2, keepdims=True))
        w /= w.sum(axis=2, keepdims=True)
        N = self.known_scores.shape[2]
        g = (w[:, :, :N] * self.known_values).sum(2) + (w[:, :, N:] * values).sum(2)    # (n, H)
        if self.spec.first_level == "softmax":
            head_logits = np.concatenate([np.zeros((X.shape[0], 1)), X @ p["gate1"].T + p["gate0"]], axis=1)
            pi = np.exp(head_logits - head_logits.max(axis=1, keepdims=True))
            pi /= pi.sum(axis=1, keepdims=True)
        else:
            pi = np.full((X.shape[0], self.H), 1.0 / self.H)
        f = (pi * g).sum(1)
        parts = dict(p, f=f, g=g, pi=pi, p_ad=w[:, :, N:], values=values)
        self._last = (key, parts)
        return parts

    def residual(self, theta: np.ndarray) -> np.ndarray:
        return self._parts(theta)["f"] - self.y

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        c, X = self._parts(theta), self.X
        n, H, L, D = X.shape[0], self.H, self.L, self.D
        dv = c["pi"][:, :, None] * c["p_ad"]                        # df / d(adapter value), (n, H, L)
        dl = dv * (c["values"] - c["g"][:, :, None])                  # df / d(adapter logit)
        cols = [dl.reshape(n, H * L)]
        if self.spec.structure == "nonshared":
            cols += [(dl[..., None] * X[:, None, None, :]).reshape(n, -1),
                     (dv[..., None] * X[:, None, None, :]).reshape(n, -1), dv.reshape(n, H * L)]
        else:
            t1, t2, t3 = (c[k].reshape(H * L, -1) for k in ("t1", "t2", "t3"))   # (HL, D), (HL, D), (HL, 1)
            z, dl, dv = c["z"].reshape(H * L, -1), dl.reshape(n, H * L), dv.reshape(n, H * L)
            # f depends on W1 through beta1_hld = s(sum_q z_hlq W1_dq): df/dW1_dq = x_d sum_hl dl_hl t1_hld z_hlq
            for d_atom, t in ((dl, t1), (dv, t2)):
                cols.append(((d_atom @ (t[:, :, None] * z[:, None, :]).reshape(H * L, -1)).reshape(n, D, -1)
                             * X[:, :, None]).reshape(n, -1))
            cols.append(dv @ (t3 * z))
            # df/dz_hlq = dl_hl sum_d x_d t1_hld W1_dq + dv_hl (sum_d x_d t2_hld W2_dq + t3_hl w3_q)
            via1 = (X @ (t1[:, :, None] * c["W1"][None]).transpose(1, 0, 2).reshape(D, -1)).reshape(n, H * L, -1)
            via2 = (X @ (t2[:, :, None] * c["W2"][None]).transpose(1, 0, 2).reshape(D, -1)).reshape(n, H * L, -1)
            dz = dl[:, :, None] * via1 + dv[:, :, None] * (via2 + t3 * c["w3"])
            cols.append(dz.reshape(n, -1))
        if self.spec.first_level == "softmax":
            dh = (c["pi"] * (c["g"] - c["f"][:, None]))[:, 1:]
            cols += [dh, (dh[:, :, None] * X[:, None, :]).reshape(n, -1)]
        return np.concatenate(cols, axis=1)
