"""Sweep configuration: a TOML file, validated in full before anything is fitted.

A configuration names a truth (a preset of :mod:`hmoe_sim.models.presets` with its options)
or an ensemble of truths (``truth.seeds``, declared before anything runs), the sample sizes
and replications, the controls fitted beside every series (``sample.controls``:
``["noise_free"]`` adds a twin fitted to the same inputs without noise), one or more *series*
(a fitted structure and an estimator protocol; e.g. ``shared`` and ``nonshared``, or
``relu/sgd-paper``; ``fit.n_starts`` starts from ``fit.init`` plus ``fit.random_starts``
random starts, all kept), and the losses to record.
Every key is checked: an unknown key or a bad value raises ``ValueError`` naming the key
(``series[1].fit.method``), and the resolved configuration -- every default filled in -- is a
plain JSON-able dict (:meth:`SweepConfig.to_dict`) whose hash is the run's *fingerprint*.

Example
-------
.. code-block:: toml

    name = "quick"
    root_seed = 0

    [truth]
    preset = "hmoe-shared"
    seeds = [1, 2, 3]          # or: seed = 0 (one truth)
    options = { gate_slope_std = 2.0 }

    [sample]
    sizes = [500, 1000, 2000]
    replications = 4
    controls = ["noise_free"]

    [fit]
    method = "lm"
    n_starts = 2               # near-truth starts per fit; the estimate is the one of least risk
    random_starts = 0

    [[series]]
    name = "shared"
    structure = "shared"

    [[series]]
    name = "nonshared"
    structure = "nonshared"
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmoe_sim import __version__
from hmoe_sim.data import X_DISTRIBUTIONS
from hmoe_sim.estimators.api import LOSSES, METHODS
from hmoe_sim.estimators.init import PAPER_NOISE
from hmoe_sim.models.presets import PRESETS, make_preset
from hmoe_sim.sweep.keys import as_bool, as_float, as_int, as_name, as_number, as_str, check_keys, fail, fail_bool

__all__ = ["SweepConfig", "fingerprint_of", "load_config", "parse_config", "LOSS_KINDS", "INIT_KINDS", "CONTROL_KINDS",
           "LADDER_PREFIX"]

LOSS_KINDS = ("D1", "D2")
INIT_KINDS = ("near_truth", "random", "paper")

_TOP_KEYS = {"name", "description", "root_seed", "device", "dtype", "threads", "truth", "sample", "fit", "series",
             "losses", "allow_nonidentifiable"}
CONTROL_KINDS = ("noise_free",)
_FIT_DEFAULTS: dict[str, Any] = {
    "method": "lm",
    "max_iter": 200,
    "tol": 1e-10,
    "init": "near_truth",
    "perturbation": 0.1,
    "n_starts": 1,
    "random_starts": 0,
    "near_optimal_loglik": 0.5,
    "paper_noise": "per_atom",
    "bounds": {},
    "options": {},
}
_SAMPLE_DEFAULTS: dict[str, Any] = {"sizes": None, "grid": None, "replications": 20, "chunk": 10,
                                    "x_dist": "uniform", "controls": []}
#: keys resolved only when used (absent from the resolved configuration otherwise, so that every
#: configuration written before they existed keeps its fingerprint and cell hashes)
_FIT_OPTIONAL = {"random_scale": 1.0}
_SAMPLE_OPTIONAL = {"control_perturbations": []}
#: prefix of the control-perturbation ladder's control names (``"perturb_0.01"``)
LADDER_PREFIX = "perturb_"
_LOSS_DEFAULTS: dict[str, Any] = {"kinds": ["D1", "D2"], "r": 1, "l2": True, "l2_n_eval": 10000}


def _sizes(sample: dict[str, Any]) -> list[int]:
    sizes, grid = sample["sizes"], sample["grid"]
    if (sizes is None) == (grid is None):
        raise fail("sample.sizes", "give exactly one of sample.sizes (a list) or sample.grid "
                                    "({min, max, points}: a log grid)")
    if sizes is not None:
        if not isinstance(sizes, list) or not sizes:
            raise fail("sample.sizes", f"must be a non-empty list of integers, got {sizes!r}")
        out = [as_int(f"sample.sizes[{i}]", s, 2) for i, s in enumerate(sizes)]
    else:
        g = check_keys("sample.grid", grid, {"min", "max", "points"})
        missing = sorted({"min", "max", "points"} - set(g))
        if missing:
            raise fail("sample.grid", f"missing {missing}")
        lo, hi = as_int("sample.grid.min", g["min"], 2), as_int("sample.grid.max", g["max"], 2)
        pts = as_int("sample.grid.points", g["points"], 2)
        if pts > MAX_FITS:
            raise fail("sample.grid.points", f"{pts} sizes is more than the {MAX_FITS} fits one sweep may hold")
        if hi <= lo:
            raise fail("sample.grid.max", f"must exceed sample.grid.min={lo}, got {hi}")
        out = [round(lo * (hi / lo) ** (i / (pts - 1))) for i in range(pts)]
    if len(set(out)) != len(out):
        raise fail("sample.sizes", f"sizes must be distinct, got {out}")
    if len(out) < 2:
        raise fail("sample.sizes", f"a rate needs at least two sample sizes, got {out}")
    return sorted(out)


def _fit(key: str, table: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    t = check_keys(key, table, {**_FIT_DEFAULTS, **_FIT_OPTIONAL})
    f = copy.deepcopy(dict(base))
    f.update(copy.deepcopy(t))
    f["method"] = as_str(f"{key}.method", f["method"], METHODS)
    f["max_iter"] = as_int(f"{key}.max_iter", f["max_iter"], 1)
    f["tol"] = as_float(f"{key}.tol", f["tol"])
    f["init"] = as_str(f"{key}.init", f["init"], INIT_KINDS)
    f["perturbation"] = as_float(f"{key}.perturbation", f["perturbation"], positive=False)
    f["n_starts"] = as_int(f"{key}.n_starts", f["n_starts"], 1)
    f["random_starts"] = as_int(f"{key}.random_starts", f["random_starts"], 0)
    f["near_optimal_loglik"] = as_float(f"{key}.near_optimal_loglik", f["near_optimal_loglik"], positive=False)
    if f["random_starts"] > 0:
        f["random_scale"] = as_float(f"{key}.random_scale", f.get("random_scale", _FIT_OPTIONAL["random_scale"]))
    elif "random_scale" in t:
        raise fail(f"{key}.random_scale", f"{t['random_scale']!r} is set but {key}.random_starts is 0; "
                                           "the scale applies to random starts only")
    else:
        f.pop("random_scale", None)
    f["paper_noise"] = as_str(f"{key}.paper_noise", f["paper_noise"], PAPER_NOISE)
    for sub in ("bounds", "options"):
        if not isinstance(f[sub], Mapping):
            raise fail(f"{key}.{sub}", f"must be a table, got {f[sub]!r}")
        f[sub] = dict(f[sub])
    f["options"] = _fit_options(f"{key}.options", f["options"])
    return f


#: checks of the known ``fit.options`` (keyword arguments of ``fit_batch``); unknown names are
#: rejected by ``hmoe_sim.sweep.checks.check_estimator_options`` against fit_batch's signature
_OPTION_CHECKS: dict[str, Any] = {
    "epochs": lambda k, v: as_int(k, v, 1),
    "batch_size": lambda k, v: as_int(k, v, 1),
    "chunk_size": lambda k, v: as_int(k, v, 1),
    "lr": lambda k, v: as_number(k, v, minimum=0.0, strict=True),
    "ftol": lambda k, v: as_number(k, v, minimum=0.0, strict=False),
    "xtol": lambda k, v: as_number(k, v, minimum=0.0, strict=False),
    "gtol": lambda k, v: as_number(k, v, minimum=0.0, strict=False),
    "loss": lambda k, v: as_str(k, v, LOSSES),
    "max_memory": lambda k, v: as_int(k, v, 1),
}

#: the most fits one sweep may plan (truths x series x (1 + controls) x sizes x replications);
#: a larger plan is refused before it is built
MAX_FITS = 1_000_000


def _check_plan_size(out: dict[str, Any]) -> None:
    """Refuse a plan of more than :data:`MAX_FITS` fits, naming its fits and cells, before building it."""
    sample = out["sample"]
    reps, chunk = sample["replications"], sample["chunk"]
    groups = sum(len(s["truth_seeds"]) for s in out["series"]) * (
        (1 + len(sample["controls"])) * len(sample["sizes"]) + len(sample.get("control_perturbations", [])))
    fits, cells = groups * reps, groups * -(-reps // chunk)
    if fits > MAX_FITS:
        raise fail("sample.replications", f"{reps} replications plan {fits} fits in {cells} cells, more than the "
                                           f"{MAX_FITS} fits one sweep may hold; lower sample.replications (or the "
                                           "number of sizes, series or truths)")


def _fit_options(key: str, options: dict[str, Any]) -> dict[str, Any]:
    """Type and range checks of the known estimator options (values kept as given)."""
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None:
            check(f"{key}.{name}", value)
    return options


def fingerprint_of(data: Mapping[str, Any], version: str) -> str:
    """SHA-256 (first 16 hex digits) of a resolved configuration as stored, and a package version.

    :attr:`SweepConfig.fingerprint` is ``fingerprint_of(config.data, __version__)``; ``report``
    and ``plot`` recompute it from what ``config.resolved.json`` holds, so an edited file no
    longer matches the fingerprint stored beside it.
    """
    payload = json.dumps({"config": data, "version": version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep configuration (see the module docstring for the file format).

    Attributes
    ----------
    data : dict
        The resolved configuration: every section with every default filled in. Series are
        a list of dicts with keys ``name``, ``preset``, ``truth_options``, ``structure``,
        ``fit``.
    """

    data: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.data["name"])

    @property
    def sizes(self) -> list[int]:
        return list(self.data["sample"]["sizes"])

    @property
    def replications(self) -> int:
        return int(self.data["sample"]["replications"])

    @property
    def series(self) -> list[dict[str, Any]]:
        return list(self.data["series"])

    @property
    def truth_seeds(self) -> list[int]:
        """The truth seeds of the sweep (one for a single-truth run; ``1..T`` for an ensemble)."""
        return list(self.data["truth"]["seeds"])

    @property
    def controls(self) -> list[str]:
        """The controls fitted beside every series (``["noise_free"]`` or ``[]``)."""
        return list(self.data["sample"]["controls"])

    @property
    def control_perturbations(self) -> dict[str, float]:
        """The control-perturbation ladder: control name (``"perturb_0.01"``) -> start perturbation.

        Each rung is a noise-free fit at the largest n from one near-truth start at that
        perturbation (``sample.control_perturbations``; empty when not set).
        """
        return {f"{LADDER_PREFIX}{p:g}": float(p) for p in self.data["sample"].get("control_perturbations", [])}

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the resolved configuration (JSON-able)."""
        return copy.deepcopy(self.data)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the resolved configuration and package version.

        Everything that can change a fitted number enters it (device and dtype included);
        execution choices (jobs, backend, progress bar) are not part of the configuration.
        """
        return fingerprint_of(self.data, __version__)

    def with_overrides(self, **top: Any) -> SweepConfig:
        """A new validated configuration with top-level keys replaced (e.g. ``device``)."""
        raw = self.to_dict()
        raw.update(top)
        return parse_config(raw)


def parse_config(raw: Mapping[str, Any], *, default_name: str = "sweep") -> SweepConfig:
    """Validate a configuration mapping and fill in every default.

    Parameters
    ----------
    raw : mapping
        The parsed TOML document (or a resolved configuration from :meth:`SweepConfig.to_dict`).
    default_name : str
        Name used when ``raw`` has no ``name`` (the file's stem for :func:`load_config`).

    Raises
    ------
    ValueError
        Unknown keys, bad values, an unknown preset or preset option, or a truth that
        cannot be built; the message names the key.
    """
    top = check_keys("", raw, _TOP_KEYS)
    out: dict[str, Any] = {
        "name": as_name("name", top.get("name", default_name)),
        "description": as_str("description", top.get("description", "")),
        "root_seed": as_int("root_seed", top.get("root_seed", 0), 0),
        "device": as_str("device", top.get("device", "cpu")),
        "dtype": as_str("dtype", top.get("dtype", "float64"), ("float32", "float64")),
        "threads": as_int("threads", top.get("threads", 1), 1),
    }
    if not (out["device"] in ("cpu", "cuda", "gpu") or out["device"].startswith("cuda:")):
        raise fail("device", f"unknown device {out['device']!r}; use 'cpu', 'cuda' or 'cuda:<index>'")

    truth = check_keys("truth", top.get("truth", {}), {"preset", "seed", "seeds", "options"})
    if "preset" not in truth:
        raise fail("truth.preset", f"is required; one of {sorted(PRESETS)}")
    out["truth"] = {
        "preset": as_str("truth.preset", truth["preset"], tuple(sorted(PRESETS))),
        "seeds": _truth_seeds(truth),
        "options": dict(check_keys("truth.options", truth.get("options", {}),
                                    set().union(*(PRESETS[p][1] for p in PRESETS)))),
    }
    out["allow_nonidentifiable"] = as_bool("allow_nonidentifiable", top.get("allow_nonidentifiable", False))

    sample = check_keys("sample", top.get("sample", {}), {**_SAMPLE_DEFAULTS, **_SAMPLE_OPTIONAL})
    sample = {**_SAMPLE_DEFAULTS, **_SAMPLE_OPTIONAL, **sample}
    reps = as_int("sample.replications", sample["replications"], 2)
    out["sample"] = {
        "sizes": _sizes(sample),
        "replications": reps,
        "chunk": as_int("sample.chunk", sample["chunk"], 1),
        "x_dist": as_str("sample.x_dist", sample["x_dist"], X_DISTRIBUTIONS),
        "controls": _controls(sample["controls"]),
    }
    ladder = _perturbations(sample["control_perturbations"])
    if ladder:
        out["sample"]["control_perturbations"] = ladder

    base_fit = _fit("fit", top.get("fit", {}), _FIT_DEFAULTS)
    raw_series = top.get("series")
    if not isinstance(raw_series, list) or not raw_series:
        raise fail("series", "at least one [[series]] table is required")
    series: list[dict[str, Any]] = []
    for i, s in enumerate(raw_series):
        key = f"series[{i}]"
        s = check_keys(key, s, {"name", "preset", "truth_options", "structure", "fit", "truth_seeds"})
        if "name" not in s:
            raise fail(f"{key}.name", "is required")
        preset = as_str(f"{key}.preset", s.get("preset", out["truth"]["preset"]), tuple(sorted(PRESETS)))
        opts = {**out["truth"]["options"], **dict(s.get("truth_options", {}))} \
            if isinstance(s.get("truth_options", {}), Mapping) else s.get("truth_options")
        opts = check_keys(f"{key}.truth_options", opts, PRESETS[preset][1])
        structure = s.get("structure")
        if structure is not None:
            structure = as_str(f"{key}.structure", structure, ("shared", "nonshared"))
            if not preset.startswith("hmoe"):
                raise fail(f"{key}.structure", f"only applies to HMoE presets, not {preset!r}")
            if structure == "shared" and preset == "hmoe-nonshared":
                raise fail(f"{key}.structure", "a non-shared truth cannot be scored by a shared fit; "
                                                "draw the truth from 'hmoe-shared'")
        series.append({"name": as_name(f"{key}.name", s["name"]), "preset": preset,
                       "truth_options": opts,
                       "structure": structure, "fit": _fit(f"{key}.fit", s.get("fit", {}), base_fit),
                       "truth_seeds": _series_truths(f"{key}.truth_seeds", s.get("truth_seeds"),
                                                     out["truth"]["seeds"])})
    names = [s["name"] for s in series]
    if len(set(names)) != len(names):
        raise fail("series", f"series names must be distinct, got {names}")
    out["series"] = series

    losses = check_keys("losses", top.get("losses", {}), _LOSS_DEFAULTS)
    losses = {**_LOSS_DEFAULTS, **losses}
    kinds = losses["kinds"]
    if not isinstance(kinds, list):
        raise fail("losses.kinds", f"must be a list, got {kinds!r}")
    out["losses"] = {
        "kinds": [as_str(f"losses.kinds[{i}]", k, LOSS_KINDS) for i, k in enumerate(kinds)],
        "r": as_int("losses.r", losses["r"], 1),
        "l2": bool(losses["l2"]) if isinstance(losses["l2"], bool) else fail_bool("losses.l2", losses["l2"]),
        "l2_n_eval": as_int("losses.l2_n_eval", losses["l2_n_eval"], 1),
    }
    if not out["losses"]["kinds"] and not out["losses"]["l2"]:
        raise fail("losses", "record at least one loss (losses.kinds or losses.l2)")

    _check_plan_size(out)
    # Build every truth now, so that a bad preset option fails before any fitting.
    for i, s in enumerate(series):
        for seed in s["truth_seeds"]:
            try:
                make_preset(s["preset"], seed=seed, **s["truth_options"])
            except (ValueError, TypeError) as err:
                raise fail(f"series[{i}].truth_options", f"the truth (seed {seed}) cannot be built: {err}") from err
    return SweepConfig(out)


def _truth_seeds(truth: Mapping[str, Any]) -> list[int]:
    """``truth.seed`` (one truth) or ``truth.seeds`` (an ensemble, declared before anything runs)."""
    if "seed" in truth and "seeds" in truth:
        raise fail("truth.seeds", "give either truth.seed (one truth) or truth.seeds (an ensemble), not both")
    if "seeds" not in truth:
        return [as_int("truth.seed", truth.get("seed", 0), 0)]
    seeds = truth["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise fail("truth.seeds", f"must be a non-empty list of integers, got {seeds!r}")
    out = [as_int(f"truth.seeds[{i}]", v, 0) for i, v in enumerate(seeds)]
    if len(set(out)) != len(out):
        raise fail("truth.seeds", f"seeds must be distinct, got {out}")
    return out


def _series_truths(key: str, value: object, seeds: list[int]) -> list[int]:
    """A series' truths: every truth seed by default, or a declared subset of them."""
    if value is None:
        return list(seeds)
    if not isinstance(value, list) or not value:
        raise fail(key, f"must be a non-empty list of truth seeds, got {value!r}")
    out = [as_int(f"{key}[{i}]", v, 0) for i, v in enumerate(value)]
    missing = sorted(set(out) - set(seeds))
    if missing:
        raise fail(key, f"seeds {missing} are not in truth.seeds={seeds}")
    if len(set(out)) != len(out):
        raise fail(key, f"seeds must be distinct, got {out}")
    return [t for t in seeds if t in out]


def _controls(value: object) -> list[str]:
    if not isinstance(value, list):
        raise fail("sample.controls", f"must be a list (e.g. [\"noise_free\"]), got {value!r}")
    out = [as_str(f"sample.controls[{i}]", v, CONTROL_KINDS) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise fail("sample.controls", f"controls must be distinct, got {out}")
    return out


def _perturbations(value: object) -> list[float]:
    """``sample.control_perturbations``: empty, or at least two distinct positive start perturbations."""
    key = "sample.control_perturbations"
    if not isinstance(value, list):
        raise fail(key, f"must be a list of start perturbations (e.g. [0.01, 0.1]), got {value!r}")
    out = sorted(as_float(f"{key}[{i}]", v) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise fail(key, f"perturbations must be distinct, got {value!r}")
    if len(out) == 1:
        raise fail(key, f"an exponent needs at least two perturbations, got {value!r}")
    return out


def load_config(path: str | Path) -> SweepConfig:
    """Read and validate a TOML sweep configuration (the name defaults to the file's stem)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"config path {str(p)!r} is a directory, not a TOML file")
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {str(p)!r} cannot be read: {err}") from err
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {str(p)!r} is not valid TOML: {err}") from err
    return parse_config(raw, default_name=p.stem)
