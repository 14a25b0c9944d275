"""Sweep configuration: a TOML file, validated in full before anything is fitted.

A configuration names a truth (a preset of :mod:`hmoe_sim.models.presets` with its options)
or an ensemble of truths (``truth.seeds``, declared before anything runs), the sample sizes
and replications, the controls fitted beside every series (``sample.controls``:
``["noise_free"]`` adds a twin fitted to the same inputs without noise), an optional noise axis
(``sample.noise_levels``: the data's noise standard deviations, crossed with the sizes; see
:mod:`hmoe_sim.sweep.cells` for what is paired), one or more *series*
(a fitted structure and an estimator protocol; e.g. ``shared`` and ``nonshared``, or
``relu/sgd-paper``; ``fit.n_starts`` starts from ``fit.init`` plus ``fit.random_starts``
random starts, all kept), and the losses to record.
Every key is checked once, by :func:`parse_config`: an unknown key or a bad value raises a
one-line ``ValueError`` naming the key (``series[1].fit.method``) and the value. The result is
a typed, frozen :class:`SweepConfig` (its sections are the dataclasses of
:mod:`hmoe_sim.sweep.schema`; the package reads attributes, ``config.sample.sizes``,
``series.fit.random_starts``), and the resolved configuration -- every default filled in -- is
a plain JSON-able dict (:meth:`SweepConfig.to_dict`) whose hash is the run's *fingerprint*.

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

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmoe_sim import __version__
from hmoe_sim.devices import cpu_available_memory
from hmoe_sim.models.presets import make_preset, preset_defaults, tensor_elements
from hmoe_sim.sweep.keys import as_bool, as_int, as_name, as_str, check_keys, fail
from hmoe_sim.sweep.schema import (
    CONTROL_KINDS,
    INIT_KINDS,
    LADDER_PREFIX,
    LOSS_KINDS,
    MAX_FITS,
    FitConfig,
    LossConfig,
    SampleConfig,
    SeriesConfig,
    TruthConfig,
    parse_fit,
    parse_losses,
    parse_sample,
    parse_series,
    parse_truth,
)

__all__ = ["SweepConfig", "file_keys", "fingerprint_of", "load_config", "parse_config", "LOSS_KINDS", "INIT_KINDS",
           "CONTROL_KINDS", "LADDER_PREFIX", "FitConfig", "LossConfig", "SampleConfig", "SeriesConfig", "TruthConfig"]


def fingerprint_of(data: Mapping[str, Any], version: str) -> str:
    """SHA-256 (first 16 hex digits) of a resolved configuration as stored, and a package version.

    :attr:`SweepConfig.fingerprint` is ``fingerprint_of(config.to_dict(), __version__)``; ``report``
    and ``plot`` recompute it from what ``config.resolved.json`` holds, so an edited file no
    longer matches the fingerprint stored beside it.
    """
    payload = json.dumps({"config": data, "version": version}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep configuration (see the module docstring for the file format).

    Built by :func:`parse_config` (or :func:`load_config`); one field per top-level key, the
    sections as the frozen dataclasses of :mod:`hmoe_sim.sweep.schema`. The ``[fit]`` table of
    the file is no field: it is the default of every series' :attr:`SeriesConfig.fit`.
    """

    name: str
    description: str
    root_seed: int
    device: str
    dtype: str
    threads: int
    truth: TruthConfig
    allow_nonidentifiable: bool
    sample: SampleConfig
    series: tuple[SeriesConfig, ...]
    losses: LossConfig

    @property
    def sizes(self) -> list[int]:
        """The sample sizes, increasing."""
        return list(self.sample.sizes)

    @property
    def replications(self) -> int:
        """Replications per size."""
        return self.sample.replications

    @property
    def truth_seeds(self) -> list[int]:
        """The truth seeds of the sweep (one for a single-truth run; ``1..T`` for an ensemble)."""
        return list(self.truth.seeds)

    @property
    def controls(self) -> list[str]:
        """The controls fitted beside every series (``["noise_free"]`` or ``[]``)."""
        return list(self.sample.controls)

    @property
    def noise_levels(self) -> list[float]:
        """The noise axis (``sample.noise_levels``, increasing); empty: each truth's own ``noise_std``."""
        return list(self.sample.noise_levels)

    @property
    def control_perturbations(self) -> dict[str, float]:
        """The control-perturbation ladder: control name (``"perturb_0.01"``) -> start perturbation.

        Each rung is a noise-free fit at the largest n from one near-truth start at that
        perturbation (``sample.control_perturbations``; empty when not set).
        """
        return {f"{LADDER_PREFIX}{p:g}": float(p) for p in self.sample.control_perturbations}

    def series_named(self, name: str) -> SeriesConfig:
        """The series called ``name``.

        Raises
        ------
        ValueError
            When no series has that name (the message lists the series).
        """
        for s in self.series:
            if s.name == name:
                return s
        raise ValueError(f"series {name!r} is not in the configuration (series: {[s.name for s in self.series]})")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as a plain JSON-able dict (a fresh copy)."""
        return {"name": self.name, "description": self.description, "root_seed": self.root_seed,
                "device": self.device, "dtype": self.dtype, "threads": self.threads, "truth": self.truth.to_dict(),
                "allow_nonidentifiable": self.allow_nonidentifiable, "sample": self.sample.to_dict(),
                "series": [s.to_dict() for s in self.series], "losses": self.losses.to_dict()}

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of the resolved configuration and package version.

        Everything that can change a fitted number enters it (device and dtype included);
        execution choices (jobs, backend, progress bar) are not part of the configuration.
        """
        return fingerprint_of(self.to_dict(), __version__)

    def with_overrides(self, **top: Any) -> SweepConfig:
        """A new validated configuration with top-level keys replaced (e.g. ``device``)."""
        raw = self.to_dict()
        raw.update(top)
        return parse_config(raw)


_SECTIONS: dict[str, type] = {"truth": TruthConfig, "sample": SampleConfig, "fit": FitConfig,
                              "series": SeriesConfig, "losses": LossConfig}
_TOP_KEYS = {f.name for f in dataclasses.fields(SweepConfig)} | {"fit"}


def file_keys() -> list[str]:
    """Every dotted key a configuration file may set, as ``experiments/configs/README.md`` names them.

    Read off the dataclass fields: a section adds its own keys under its name (a series' ``fit``
    is documented once, as ``fit.*``); field metadata adds the file's alternatives to a
    resolved key (``also``: ``truth.seed``, ``sample.grid``) and the keys of a table (``sub``:
    ``fit.bounds.default``). Preset options (``truth.options``) are the presets' own.
    """
    def walk(cls: type, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            key, section = f"{prefix}{f.name}", f.metadata.get("section")
            if f.name in _SECTIONS and section is None:
                out += walk(_SECTIONS[f.name], f"{key}.")
                continue
            out += [key, *(f"{prefix}{alt}" for alt in f.metadata.get("also", ())),
                    *(f"{key}.{sub}" for sub in f.metadata.get("sub", ()))]
            if section is not None:
                out += walk(_SECTIONS[section], f"{section}.")
        return out

    return walk(SweepConfig, "")


def _check_plan_size(truth_seeds: int, sample: SampleConfig) -> None:
    """Refuse a plan of more than :data:`MAX_FITS` fits, naming its fits and cells, before building it."""
    reps = sample.replications
    levels = max(1, len(sample.noise_levels))  # the noisy fits at every noise level; each control once
    groups = truth_seeds * ((levels + len(sample.controls)) * len(sample.sizes) + len(sample.control_perturbations))
    fits, cells = groups * reps, groups * -(-reps // sample.chunk)
    if fits > MAX_FITS:
        raise fail("sample.replications", f"{reps} replications plan {fits} fits in {cells} cells, more than the "
                                           f"{MAX_FITS} fits one sweep may hold; lower sample.replications (or the "
                                           "number of sizes, noise levels, series or truths)")


def _check_noise_axis(sample: SampleConfig, truth: TruthConfig, series: tuple[SeriesConfig, ...]) -> None:
    """Refuse a noise axis beside an explicit ``noise_std`` truth option: which σ the data have would be ambiguous."""
    if not sample.noise_levels:
        return
    for i, s in enumerate(series):
        if "noise_std" in s.truth_options:
            key = "truth.options.noise_std" if "noise_std" in truth.options else f"series[{i}].truth_options.noise_std"
            raise fail(key, f"{s.truth_options['noise_std']!r} sets the data's noise while sample.noise_levels = "
                            f"{list(sample.noise_levels)} sets it per cell; remove {key} (on a noise axis the data's "
                            "noise levels are sample.noise_levels)")


def _check_starts(series: tuple[SeriesConfig, ...], sample: SampleConfig, base_fit: FitConfig) -> None:
    """Refuse a plan of more than :data:`MAX_FITS` fitted starts (fits x starts per fit), naming the starts key."""
    reps, sizes = sample.replications, (1 + len(sample.controls)) * len(sample.sizes)
    rungs = len(sample.control_perturbations)  # one start each
    starts = sum(reps * len(s.truth_seeds) * (sizes * (s.fit.n_starts + s.fit.random_starts) + rungs) for s in series)
    if starts <= MAX_FITS:
        return
    i, s = max(enumerate(series), key=lambda item: item[1].fit.n_starts + item[1].fit.random_starts)
    name = "random_starts" if s.fit.random_starts >= s.fit.n_starts else "n_starts"
    value = getattr(s.fit, name)
    key = f"fit.{name}" if value == getattr(base_fit, name) else f"series[{i}].fit.{name}"
    raise fail(key, f"{value} makes {s.fit.n_starts + s.fit.random_starts} starts per fit: the plan fits {starts} "
                    f"starts, more than the {MAX_FITS} one sweep may run; lower fit.n_starts or fit.random_starts")


def _truth_option_key(i: int, raw_series: object, option: str) -> str:
    """Where a series' truth option was set: ``series[i].truth_options.<option>`` or ``truth.options.<option>``."""
    own = raw_series.get("truth_options", {}) if isinstance(raw_series, Mapping) else {}
    return f"series[{i}].truth_options.{option}" if isinstance(own, Mapping) and option in own else \
        f"truth.options.{option}"


def _check_truth_size(i: int, series: SeriesConfig, raw_series: object) -> None:
    """Refuse a truth whose tensors (the frozen attention's weights) cannot be built in this machine's memory."""
    try:
        fixed, _, option = tensor_elements(series.preset, **series.truth_options)
    except (ValueError, TypeError):  # a bad value: refused, named, when the truth is built
        return
    need, available = 8 * fixed, cpu_available_memory()
    if option is not None and need > available:
        value = {**preset_defaults(series.preset), **series.truth_options}[option]
        raise fail(_truth_option_key(i, raw_series, option),
                   f"{option} = {value} makes the truth of preset {series.preset!r} hold {fixed} numbers "
                   f"({need / 1024**3:.1f} GiB), more than the {available / 1024**3:.1f} GiB of memory available")


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
        cannot be built; one line naming the key and the value.
    """
    top = check_keys("", raw, _TOP_KEYS)
    device = as_str("device", top.get("device", "cpu"))
    scalars = {
        "name": as_name("name", top.get("name", default_name)),
        "description": as_str("description", top.get("description", "")),
        "root_seed": as_int("root_seed", top.get("root_seed", 0), 0),
        "device": device,
        "dtype": as_str("dtype", top.get("dtype", "float64"), ("float32", "float64")),
        "threads": as_int("threads", top.get("threads", 1), 1),
    }
    if not (device in ("cpu", "cuda", "gpu") or device.startswith("cuda:")):
        raise fail("device", f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:<index>'")
    truth = parse_truth(top.get("truth", {}))
    allow = as_bool("allow_nonidentifiable", top.get("allow_nonidentifiable", False))
    sample = parse_sample(top.get("sample", {}))
    base_fit = parse_fit("fit", top.get("fit", {}))
    raw_series = top.get("series")
    if not isinstance(raw_series, list) or not raw_series:
        raise fail("series", "at least one [[series]] table is required")
    series = tuple(parse_series(i, s, truth, base_fit) for i, s in enumerate(raw_series))
    names = [s.name for s in series]
    if len(set(names)) != len(names):
        raise fail("series", f"series names must be distinct, got {names}")
    losses = parse_losses(top.get("losses", {}))
    _check_noise_axis(sample, truth, series)
    _check_plan_size(sum(len(s.truth_seeds) for s in series), sample)
    _check_starts(series, sample, base_fit)
    # Build every truth now, so that a bad preset option fails before any fitting.
    for i, s in enumerate(series):
        _check_truth_size(i, s, raw_series[i])
        for seed in s.truth_seeds:
            try:
                make_preset(s.preset, seed=seed, **s.truth_options)
            except (ValueError, TypeError) as err:
                raise fail(f"series[{i}].truth_options", f"the truth (seed {seed}) cannot be built: {err}") from err
    return SweepConfig(**scalars, truth=truth, allow_nonidentifiable=allow, sample=sample, series=series,
                       losses=losses)


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
