"""Diagnostic tables over the preset cases of ``paper_notes/07_diagnostics.md``.

:func:`floor_table` lists the losses of every exact representation
(:mod:`~hmoe_sim.identifiability.exact`) over-specified and at the true size;
:func:`spectrum_table` the true-size Jacobian spectra and the identifiability verdicts
(:mod:`~hmoe_sim.identifiability.spectra`). ``experiments/identifiability.py`` writes both.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from hmoe_sim.identifiability.exact import atoms_per_group, representation_losses
from hmoe_sim.identifiability.spectra import gate_logit_spread, jacobian_spectrum, nonidentifiable_reason
from hmoe_sim.losses import eval_sample
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset

__all__ = ["DIAGNOSTIC_CASES", "Case", "floor_table", "spectrum_table"]

#: ``(label, preset, option overrides, structure of the fit or None)``
Case = tuple[str, str, dict[str, Any], str | None]

_CALIBRATION = dict(input_dim=4, n_true=2, n_fit=3, gate_slope_std=2.0, expert_std=1.0, min_separation=1.0)
_FIGURE1 = dict(input_dim=32, n_true=8, n_fit=9, expert="relu")
_HEADLINE = dict(expert_std=2.0, gate_slope_std=2.0, attention_std=0.3, code_activation="identity")

#: the preset cases of ``paper_notes/07_diagnostics.md``: defaults, each expert kind of the sigmoid
#: regimes, the calibration truths (D = 4, gate sd 2, experts sd 1, separation 1), the sibling
#: papers' Figure 1 pair (d = 32, k* = 8, k = 9) and the headline HMoE truth with both fits
DIAGNOSTIC_CASES: tuple[Case, ...] = (
    ("softmax-linear", "softmax-linear", {}, None),
    ("softmax-relu", "softmax-relu", {}, None),
    ("softmax-tanh", "softmax-tanh", {}, None),
    ("softmax-linear calibration", "softmax-linear", _CALIBRATION, None),
    ("softmax-relu calibration", "softmax-relu", _CALIBRATION, None),
    ("softmax-tanh calibration", "softmax-tanh", _CALIBRATION, None),
    ("sigmoid-regime1 linear", "sigmoid-regime1", {"expert": "identity"}, None),
    ("sigmoid-regime1 relu", "sigmoid-regime1", {"expert": "relu"}, None),
    ("sigmoid-regime1 tanh", "sigmoid-regime1", {"expert": "tanh"}, None),
    ("sigmoid-regime2 linear", "sigmoid-regime2", {"expert": "identity"}, None),
    ("sigmoid-regime2 relu", "sigmoid-regime2", {"expert": "relu"}, None),
    ("sigmoid-regime2 tanh", "sigmoid-regime2", {"expert": "tanh"}, None),
    ("sigmoid-regime2 tanh, gate sd 2", "sigmoid-regime2", {"expert": "tanh", "gate_slope_std": 2.0,
                                                             "expert_std": 1.0}, None),
    ("figure 1 sigmoid (regime 2)", "sigmoid-regime2", _FIGURE1, None),
    ("figure 1 softmax (anchor)", "softmax-relu", dict(_FIGURE1, zero_gate_slopes=1), None),
    ("hmoe-nonshared", "hmoe-nonshared", {}, None),
    ("hmoe-shared", "hmoe-shared", {}, None),
    ("headline truth, shared fit", "hmoe-shared", _HEADLINE, None),
    ("headline truth, non-shared fit", "hmoe-shared", _HEADLINE, "nonshared"),
)


def _case_models(case: Case, seed: int) -> tuple[MixtureModel, MixtureModel, Params, dict[str, Any]]:
    """``(fit_model, true_model, truth, options)`` of a case, the truth in the fit's structure."""
    _, preset, options, structure = case
    setup = make_preset(preset, seed=seed, **options)
    fit_model, true_model, truth = setup.fit_model, setup.true_model, setup.truth
    if structure is not None:
        if not isinstance(true_model, HMoE) or not isinstance(fit_model, HMoE):
            raise ValueError(f"case {case[0]!r}: a fit structure needs an HMoE preset, got {preset!r}")
        fit_model = fit_model.with_structure(structure)
        true_model, truth = true_model.with_structure(structure), true_model.to_nonshared(truth)
    return fit_model, true_model, truth, setup.options


def floor_table(cases: tuple[Case, ...] = DIAGNOSTIC_CASES, *, seed: int = 0, delta: float = 0.1,
                r: float = 1) -> pd.DataFrame:
    """Losses of every exact representation, over-specified (``k``) and at the true size (``k*``).

    Returns
    -------
    pandas.DataFrame
        One row per case, size and family: ``case, size ("k" or "k*"), family, D1, D2``; a
        case with no family at a size gets one row with family ``"(none)"`` and losses 0.
    """
    rows = []
    for case in cases:
        fit_model, true_model, truth, _ = _case_models(case, seed)
        true_fit = fit_model.with_atoms(atoms_per_group(true_model))
        for size, model in (("k", fit_model), ("k*", true_fit)):
            losses = representation_losses(model, true_model, truth, r=r, delta=delta)
            for family, values in (losses or {"(none)": {"D1": 0.0, "D2": 0.0}}).items():
                rows.append({"case": case[0], "size": size, "family": family, **values})
    return pd.DataFrame(rows)


def spectrum_table(cases: tuple[Case, ...] = DIAGNOSTIC_CASES, *, seed: int = 0, n_points: int = 10_000,
                   zero_tol: float = 1e-10) -> pd.DataFrame:
    """True-size Jacobian spectra at the truth and gate-logit spreads, one row per case.

    Columns: ``case, n_params, n_gauge, largest, smallest, ratio`` (gauge removed), ``n_zero``
    (singular values below ``zero_tol`` x the largest), ``gate_logit_sd`` (mean of
    :func:`gate_logit_spread` over the free atoms with a non-zero gate slope, 0 when there is
    none; flat models only, else NaN), ``reason`` (the
    structural or numerical reason of :func:`nonidentifiable_reason`, empty when identifiable).
    The inputs are :func:`hmoe_sim.losses.eval_sample` ``(D, n_points, 0)``.
    """
    rows = []
    for case in cases:
        _, true_model, truth, _ = _case_models(case, seed)
        X = eval_sample(true_model.input_dim, n_points, 0)
        spec = jacobian_spectrum(true_model, truth, X)
        s = spec.singular_values
        spread = float("nan")
        if isinstance(true_model, FlatMoE):
            per_atom = gate_logit_spread(true_model, truth, X)
            sloped = per_atom[(truth["beta1"] != 0).any(-1).numpy()]
            spread = float(sloped.mean()) if sloped.size else 0.0
        reason = nonidentifiable_reason(case[1], case[2], seed=seed, n_points=n_points) if case[3] is None else None
        rows.append({"case": case[0], "n_params": spec.n_params, "n_gauge": spec.n_gauge, "largest": float(s[0]),
                     "smallest": float(s[-1]), "ratio": spec.ratio, "n_zero": int((s < zero_tol * s[0]).sum()),
                     "gate_logit_sd": spread, "reason": reason or ""})
    return pd.DataFrame(rows)
