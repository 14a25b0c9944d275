"""The sections of a sweep configuration as typed, frozen values, each validated once.

One frozen dataclass per section -- :class:`TruthConfig`, :class:`SampleConfig`,
:class:`FitConfig`, :class:`SeriesConfig`, :class:`LossConfig` -- with one field per resolved
key. Each is built by its ``parse`` function from a TOML table (every key and value checked,
every error one line naming the key and the bad value, :mod:`hmoe_sim.sweep.keys`), and
``to_dict()`` gives back exactly the resolved table the configuration's fingerprint and the
cell hashes are computed from. Field metadata documents the file's keys that are not fields
(``also``: ``truth.seed``, ``sample.grid``; ``sub``: the keys of ``fit.bounds`` and
``fit.options``; ``section``: a series' ``fit`` follows ``[fit]``), read by
:func:`hmoe_sim.sweep.config.file_keys`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hmoe_sim.data import X_DISTRIBUTIONS
from hmoe_sim.estimators.api import LOSSES, METHODS
from hmoe_sim.estimators.init import PAPER_NOISE
from hmoe_sim.models.presets import PRESETS
from hmoe_sim.sweep.keys import as_bool, as_float, as_int, as_name, as_number, as_str, check_keys, fail

__all__ = ["BOUNDS_KEYS", "CONTROL_KINDS", "FitConfig", "INIT_KINDS", "LADDER_PREFIX", "LOSS_KINDS", "LossConfig",
           "MAX_FITS", "OPTION_CHECKS", "SampleConfig", "SeriesConfig", "TruthConfig", "parse_fit",
           "parse_losses", "parse_sample", "parse_series", "parse_truth"]

LOSS_KINDS = ("D1", "D2")
INIT_KINDS = ("near_truth", "random", "paper")
CONTROL_KINDS = ("noise_free",)
#: prefix of the control-perturbation ladder's control names (``"perturb_0.01"``)
LADDER_PREFIX = "perturb_"
#: the keys of a ``fit.bounds`` table (see :func:`hmoe_sim.sweep.setup.fit_bounds`)
BOUNDS_KEYS = ("default", "limits", "boundary_tol")
#: the most fits one sweep may plan (truths x series x (1 + controls) x sizes x replications);
#: a larger plan is refused before it is built
MAX_FITS = 1_000_000

#: checks of the known ``fit.options`` (keyword arguments of ``fit_batch``); unknown names are
#: rejected by ``hmoe_sim.sweep.checks.check_estimator_options`` against fit_batch's signature
OPTION_CHECKS: dict[str, Any] = {
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


def _table(**meta: Any) -> Any:
    """A field holding a free-form table (an empty dict by default); ``meta`` documents its keys."""
    return field(default_factory=dict, metadata=meta)


@dataclass(frozen=True)
class TruthConfig:
    """``[truth]``: the preset, its truth seeds (``truth.seed`` or ``truth.seeds``) and options."""

    preset: str
    seeds: tuple[int, ...] = field(metadata={"also": ("seed",)})
    options: dict[str, Any] = _table()

    def to_dict(self) -> dict[str, Any]:
        """The resolved ``truth`` table."""
        return {"preset": self.preset, "seeds": list(self.seeds), "options": copy.deepcopy(self.options)}


@dataclass(frozen=True)
class SampleConfig:
    """``[sample]``: sizes (``sample.sizes`` or ``sample.grid``), replications, cells, controls."""

    sizes: tuple[int, ...] = field(metadata={"also": ("grid",)})
    replications: int = 20
    chunk: int = 10
    x_dist: str = "uniform"
    controls: tuple[str, ...] = ()
    #: recorded in the resolved configuration only when not empty (older fingerprints stay)
    control_perturbations: tuple[float, ...] = ()
    #: the noise axis: the data's noise standard deviations, increasing, crossed with the sizes;
    #: empty: the truth's own ``noise_std``. Recorded only when set (older fingerprints stay)
    noise_levels: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The resolved ``sample`` table (``control_perturbations`` and ``noise_levels`` only when set)."""
        out: dict[str, Any] = {"sizes": list(self.sizes), "replications": self.replications, "chunk": self.chunk,
                               "x_dist": self.x_dist, "controls": list(self.controls)}
        if self.control_perturbations:
            out["control_perturbations"] = list(self.control_perturbations)
        if self.noise_levels:
            out["noise_levels"] = list(self.noise_levels)
        return out


@dataclass(frozen=True)
class FitConfig:
    """``[fit]`` (and a series' ``fit`` table): the estimator protocol of a series."""

    method: str = "lm"
    max_iter: int = 200
    tol: float = 1e-10
    init: str = "near_truth"
    perturbation: float = 0.1
    n_starts: int = 1
    random_starts: int = 0
    near_optimal_loglik: float = 0.5
    paper_noise: str = "per_atom"
    bounds: dict[str, Any] = _table(sub=BOUNDS_KEYS)
    options: dict[str, Any] = _table(sub=tuple(OPTION_CHECKS))
    #: recorded in the resolved configuration only when ``random_starts > 0`` (older fingerprints stay)
    random_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """The resolved ``fit`` table (``random_scale`` only with random starts)."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.random_starts == 0:
            del out["random_scale"]
        return out


@dataclass(frozen=True)
class SeriesConfig:
    """One ``[[series]]`` entry: a fitted structure on a preset, with its fit protocol and truths."""

    name: str
    preset: str
    truth_options: dict[str, Any]
    structure: str | None
    fit: FitConfig = field(metadata={"section": "fit"})
    truth_seeds: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The resolved series entry."""
        return {"name": self.name, "preset": self.preset, "truth_options": copy.deepcopy(self.truth_options),
                "structure": self.structure, "fit": self.fit.to_dict(), "truth_seeds": list(self.truth_seeds)}


@dataclass(frozen=True)
class LossConfig:
    """``[losses]``: the losses recorded per fit."""

    kinds: tuple[str, ...] = LOSS_KINDS
    r: int = 1
    l2: bool = True
    l2_n_eval: int = 10000

    @property
    def columns(self) -> list[str]:
        """The loss columns recorded (``D1``, ``D2``, ``L2`` as configured)."""
        return list(self.kinds) + (["L2"] if self.l2 else [])

    def to_dict(self) -> dict[str, Any]:
        """The resolved ``losses`` table."""
        return {"kinds": list(self.kinds), "r": self.r, "l2": self.l2, "l2_n_eval": self.l2_n_eval}


def _defaults(cls: type) -> dict[str, Any]:
    """The default of every field of ``cls`` that has one (a fresh copy of table defaults)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:  # a tuple default as the file writes it: a list
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def parse_truth(table: object) -> TruthConfig:
    """The ``[truth]`` section (``truth.preset`` required; ``truth.seed`` or ``truth.seeds``)."""
    truth = check_keys("truth", table, {"preset", "seed", "seeds", "options"})
    if "preset" not in truth:
        raise fail("truth.preset", f"is required; one of {sorted(PRESETS)}")
    return TruthConfig(
        preset=as_str("truth.preset", truth["preset"], tuple(sorted(PRESETS))),
        seeds=tuple(_truth_seeds(truth)),
        options=dict(check_keys("truth.options", truth.get("options", {}),
                                set().union(*(PRESETS[p][1] for p in PRESETS)))))


def parse_sample(table: object) -> SampleConfig:
    """The ``[sample]`` section."""
    known = {f.name for f in dataclasses.fields(SampleConfig)} | {"grid"}
    given = check_keys("sample", table, known)
    sample = {**_defaults(SampleConfig), "sizes": None, "grid": None, **given}
    return SampleConfig(
        sizes=tuple(_sizes(sample)),
        replications=as_int("sample.replications", sample["replications"], 2),
        chunk=as_int("sample.chunk", sample["chunk"], 1),
        x_dist=as_str("sample.x_dist", sample["x_dist"], X_DISTRIBUTIONS),
        controls=tuple(_controls(sample["controls"])),
        control_perturbations=tuple(_perturbations(sample["control_perturbations"])),
        noise_levels=tuple(_noise_levels(given["noise_levels"]) if "noise_levels" in given else ()))


def parse_fit(key: str, table: object, base: FitConfig | None = None) -> FitConfig:
    """A ``fit`` table at ``key`` over ``base`` (the ``[fit]`` defaults of every series).

    A key the table sets replaces the base's (``bounds`` and ``options`` as whole tables);
    ``random_scale`` applies to random starts only and may not be set without them.
    """
    t = check_keys(key, table, {f.name for f in dataclasses.fields(FitConfig)})
    f = base.to_dict() if base is not None else {k: v for k, v in _defaults(FitConfig).items() if k != "random_scale"}
    f.update(copy.deepcopy(t))
    out: dict[str, Any] = {
        "method": as_str(f"{key}.method", f["method"], METHODS),
        "max_iter": as_int(f"{key}.max_iter", f["max_iter"], 1),
        "tol": as_float(f"{key}.tol", f["tol"]),
        "init": as_str(f"{key}.init", f["init"], INIT_KINDS),
        "perturbation": as_float(f"{key}.perturbation", f["perturbation"], positive=False),
        "n_starts": as_int(f"{key}.n_starts", f["n_starts"], 1),
        "random_starts": as_int(f"{key}.random_starts", f["random_starts"], 0),
        "near_optimal_loglik": as_float(f"{key}.near_optimal_loglik", f["near_optimal_loglik"], positive=False),
    }
    if out["random_starts"] > 0:
        out["random_scale"] = as_float(f"{key}.random_scale", f.get("random_scale", 1.0))
    elif "random_scale" in t:
        raise fail(f"{key}.random_scale", f"{t['random_scale']!r} is set but {key}.random_starts is 0; "
                                           "the scale applies to random starts only")
    out["paper_noise"] = as_str(f"{key}.paper_noise", f["paper_noise"], PAPER_NOISE)
    for sub in ("bounds", "options"):
        if not isinstance(f[sub], Mapping):
            raise fail(f"{key}.{sub}", f"must be a table, got {f[sub]!r}")
        out[sub] = dict(f[sub])
    check_keys(f"{key}.bounds", out["bounds"], set(BOUNDS_KEYS))
    for name, value in out["options"].items():
        check = OPTION_CHECKS.get(name)
        if check is not None:
            check(f"{key}.options.{name}", value)
    return FitConfig(**out)


def parse_series(i: int, table: object, truth: TruthConfig, base_fit: FitConfig) -> SeriesConfig:
    """Entry ``i`` of ``[[series]]``; preset, options and truths default to the ``[truth]`` section's."""
    key = f"series[{i}]"
    s = check_keys(key, table, {f.name for f in dataclasses.fields(SeriesConfig)})
    if "name" not in s:
        raise fail(f"{key}.name", "is required")
    preset = as_str(f"{key}.preset", s.get("preset", truth.preset), tuple(sorted(PRESETS)))
    opts = {**truth.options, **dict(s.get("truth_options", {}))} \
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
    return SeriesConfig(name=as_name(f"{key}.name", s["name"]), preset=preset, truth_options=opts,
                        structure=structure, fit=parse_fit(f"{key}.fit", s.get("fit", {}), base_fit),
                        truth_seeds=tuple(_series_truths(f"{key}.truth_seeds", s.get("truth_seeds"),
                                                         list(truth.seeds))))


def parse_losses(table: object) -> LossConfig:
    """The ``[losses]`` section (at least one loss recorded)."""
    known = {f.name for f in dataclasses.fields(LossConfig)}
    losses = {**_defaults(LossConfig), **check_keys("losses", table, known)}
    kinds = losses["kinds"]
    if not isinstance(kinds, list):
        raise fail("losses.kinds", f"must be a list, got {kinds!r}")
    out = LossConfig(kinds=tuple(as_str(f"losses.kinds[{i}]", k, LOSS_KINDS) for i, k in enumerate(kinds)),
                     r=as_int("losses.r", losses["r"], 1), l2=as_bool("losses.l2", losses["l2"]),
                     l2_n_eval=as_int("losses.l2_n_eval", losses["l2_n_eval"], 1))
    if len(set(out.kinds)) != len(out.kinds):
        raise fail("losses.kinds", f"kinds must be distinct, got {list(out.kinds)}")
    if not out.kinds and not out.l2:
        raise fail("losses", "record at least one loss (losses.kinds or losses.l2)")
    return out


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


def _noise_levels(value: object) -> list[float]:
    """``sample.noise_levels``: a non-empty list of distinct finite noise standard deviations ``> 0``, sorted."""
    key = "sample.noise_levels"
    if not isinstance(value, list) or not value:
        raise fail(key, f"must be a non-empty list of noise standard deviations > 0 (e.g. [0.05, 0.005]), "
                        f"got {value!r}")
    out = [as_float(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        repeated = sorted({v for v in out if out.count(v) > 1})
        raise fail(key, f"noise levels must be distinct, got {value!r} ({', '.join(f'{v:g}' for v in repeated)} "
                        "repeated)")
    return sorted(out)


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
