"""The typed sweep configuration: frozen sections, attribute reads, the reference kept to the schema.

``tests/test_config_stability.py`` guards that ``to_dict()``, the fingerprint and every cell hash
of the committed configurations are unchanged; here: the types, the one-line errors, that the
package reads attributes rather than string keys, and that ``experiments/configs/README.md``
documents exactly the keys of the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from test_sweep_config import BASE, with_change

from hmoe_sim.sweep.config import (
    FitConfig,
    LossConfig,
    SampleConfig,
    SeriesConfig,
    SweepConfig,
    TruthConfig,
    file_keys,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
#: the modules that define and check the configuration (the only ones that read its tables by key)
CONFIG_MODULES = {"config.py", "schema.py", "keys.py"}
#: config field names that are also column names of the result tables (``results["series"]``)
RESULT_COLUMNS = {"truth", "series", "structure", "n_starts"}


def test_sections_are_typed_frozen_values():
    raw = with_change("fit", {"random_starts": 2, "random_scale": 2.0, "options": {"ftol": 1e-9}})
    raw["sample"]["control_perturbations"] = [0.1, 0.01]
    config = parse_config(raw)
    assert isinstance(config.truth, TruthConfig) and isinstance(config.sample, SampleConfig)
    assert isinstance(config.losses, LossConfig) and all(isinstance(s, SeriesConfig) for s in config.series)
    fit = config.series[1].fit
    assert isinstance(fit, FitConfig) and (fit.random_starts, fit.random_scale, fit.n_starts) == (2, 2.0, 1)
    assert config.sample.sizes == (200, 400) and config.sample.control_perturbations == (0.01, 0.1)
    assert config.control_perturbations == {"perturb_0.01": 0.01, "perturb_0.1": 0.1}
    assert config.truth.seeds == (3,) and config.series[0].truth_seeds == (3,) and config.losses.columns == [
        "D1", "D2", "L2"]
    assert config.series_named("nonshared") is config.series[1]
    with pytest.raises(ValueError, match=r"series 'other' is not in the configuration \(series: \['shared', "):
        config.series_named("other")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sample.chunk = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.series[0].fit.method = "adam"  # type: ignore[misc]
    assert not hasattr(config, "data")  # no dict to read string keys from
    d = config.to_dict()
    d["series"][1]["fit"]["options"]["ftol"] = 1.0  # a copy: the configuration does not change
    assert config.series[1].fit.options == {"ftol": 1e-9}
    assert parse_config(d).series[1].fit.options == {"ftol": 1.0}


def test_optional_keys_are_resolved_only_when_used():
    plain = parse_config(BASE).to_dict()
    assert "control_perturbations" not in plain["sample"]
    assert all("random_scale" not in s["fit"] for s in plain["series"])
    assert parse_config(BASE).series[0].fit.random_scale == 1.0  # the value the random starts would use
    raw = with_change("series.1.fit", {"random_starts": 1})
    resolved = parse_config(raw).to_dict()
    assert "random_scale" not in resolved["series"][0]["fit"] and resolved["series"][1]["fit"]["random_scale"] == 1.0


@pytest.mark.parametrize(("path", "value", "key", "shown"), [
    ("fit.method", "bfgs", "fit.method", "'bfgs'"),
    ("series.1.fit", {"init": "anywhere"}, "series[1].fit.init", "'anywhere'"),
    ("fit.random_scale", 2.0, "fit.random_scale", "2.0"),
    ("fit.options", {"lr": -1}, "fit.options.lr", "-1"),
    ("fit.bounds", {"lims": {}}, "fit.bounds.lims", "lims"),
    ("fit.bounds", [1, 2], "fit.bounds", "[1, 2]"),
    ("sample.replications", 1, "sample.replications", "1"),
    ("sample.sizes", [0, 100], "sample.sizes[0]", "0"),
    ("sample.x_dist", "cauchy", "sample.x_dist", "'cauchy'"),
    ("sample.control_perturbations", [0.1], "sample.control_perturbations", "[0.1]"),
    ("truth", {"preset": "hmoe-shared", "seeds": [1, 1]}, "truth.seeds", "[1, 1]"),
    ("series.0.truth_seeds", [9], "series[0].truth_seeds", "[9]"),
    ("losses.l2", "yes", "losses.l2", "'yes'"),
    ("threads", 0, "threads", "0"),
    ("device", "tpu", "device", "'tpu'"),
    ("name", "../up", "name", "'../up'"),
])
def test_every_error_is_one_line_naming_key_and_value(path: str, value: object, key: str, shown: str):
    with pytest.raises(ValueError) as err:
        parse_config(with_change(path, value))
    message = str(err.value)
    assert "\n" not in message and f"'{key}" in message and shown in message, message


def string_key_reads(source: str, keys: set[str]) -> list[str]:
    """``x["key"]`` subscripts and ``x.get("key")`` calls in ``source`` with ``key`` in ``keys``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript):
            target = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args:
            target = node.args[0]
        else:
            continue
        if isinstance(target, ast.Constant) and target.value in keys:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def config_keys() -> set[str]:
    """Every field name of the configuration and its sections, less the result-table column names."""
    classes = [SweepConfig, TruthConfig, SampleConfig, FitConfig, SeriesConfig, LossConfig]
    return {f.name for cls in classes for f in dataclasses.fields(cls)} - RESULT_COLUMNS


def test_the_key_read_finder_finds_reads():
    old = 'size = int(config.data["sample"]["chunk"])\nscale = fit.get("random_scale", 1.0)\nx = rows["n"]'
    assert sorted(string_key_reads(old, config_keys())) == ["line 1: config.data['sample']",
                                                            "line 1: config.data['sample']['chunk']",
                                                            "line 2: fit.get('random_scale', 1.0)"]


def test_the_package_reads_the_configuration_by_attribute():
    modules = [p for p in sorted((ROOT / "hmoe_sim" / "sweep").glob("*.py")) if p.name not in CONFIG_MODULES]
    modules.append(ROOT / "hmoe_sim" / "cli.py")
    reads = {p.name: string_key_reads(p.read_text(), config_keys()) for p in modules}
    assert len(modules) > 10 and not {name: r for name, r in reads.items() if r}


def reference_keys() -> list[str]:
    """The dotted keys in the first column of every ``| key | ...`` table of the configs README."""
    keys, in_table = [], False
    for line in (ROOT / "experiments" / "configs" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_table = False
        elif cells[0] == "key":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            keys += re.findall(r"`([A-Za-z_][\w.]*)`", cells[0])
    return keys


def test_the_reference_documents_exactly_the_schema():
    documented, schema = reference_keys(), file_keys()
    assert len(documented) == len(set(documented)), "a key is documented twice"
    assert sorted(set(schema) - set(documented)) == [], "keys of the schema missing from the README"
    assert sorted(set(documented) - set(schema)) == [], "README keys that are not in the schema"
    assert {"truth.seed", "sample.grid", "series.fit", "fit.bounds.limits", "fit.options.lr", "fit.random_scale",
            "sample.control_perturbations"} <= set(schema)

