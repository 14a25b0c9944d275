"""experiments/profile_sweep_steps.py: the split of a sweep's LM iterations adds up, and the cells it
computes are those of the sweep itself (the timers change no number)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hmoe_sim.sweep.cell import run_cell
from hmoe_sim.sweep.cells import plan_cells
from hmoe_sim.sweep.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "profile_sweep_steps.py"

CONFIG = """
name = "tiny"
root_seed = 0
[truth]
preset = "hmoe-shared"
seed = 0
options = { code_activation = "identity", noise_std = 0.05 }
[sample]
sizes = [200, 400]
replications = 2
chunk = 2
controls = ["noise_free"]
[fit]
method = "lm"
max_iter = 30
init = "near_truth"
perturbation = 0.1
n_starts = 2
[[series]]
name = "shared"
structure = "shared"
[[series]]
name = "nonshared"
structure = "nonshared"
[losses]
kinds = ["D1"]
r = 1
l2 = false
"""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    folder = tmp_path_factory.mktemp("profile")
    config = folder / "tiny.toml"
    config.write_text(CONFIG)
    out = folder / "steps.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(config), "--series", "shared", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, check=True)
    return config, json.loads(out.read_text()), run.stdout


def test_the_split_adds_up_and_covers_every_cell_of_the_series(profiled: tuple[Path, dict, str]) -> None:
    config, report, stdout = profiled
    cells = [c for c in plan_cells(load_config(config)) if c.series == "shared"]
    assert len(report["cells"]) == len(cells) == 4
    seconds, by_step = report["seconds"], report["by_step"]
    assert seconds["linearize"] > 0 and seconds["normal_equations"] > 0
    assert 0 < seconds["factor_gram"] <= seconds["normal_equations"]
    assert seconds["linearize"] + seconds["normal_equations"] <= by_step["all steps"]
    assert by_step["all steps"] <= seconds["fit_batch"] <= report["cells_s"]
    assert by_step["steps of 1-2 problems"] <= by_step["steps of 1-4 problems"] <= by_step["all steps"]
    # max_iter = 30: some fits end at the cap, and the iterations beside them are counted
    assert 0 < by_step["steps with a fit that ends at the cap"] <= by_step["all steps"]
    assert "of which the factor Gram" in stdout


def test_the_timers_change_no_number(profiled: tuple[Path, dict, str], tmp_path: Path) -> None:
    config = profiled[0]
    check = tmp_path / "check.py"
    # the cells computed under the script's timers, in a fresh process, against run_cell here
    check.write_text(
        "import sys, runpy\n"
        f"sys.argv = [{str(SCRIPT)!r}, {str(config)!r}, '--series', 'shared']\n"
        "mod = runpy.run_path(sys.argv[0], run_name='profile')\n"
        "mod['_install_timers']()\n"
        "from hmoe_sim.sweep import cell\n"
        "from hmoe_sim.sweep.cells import plan_cells\n"
        "from hmoe_sim.sweep.config import load_config\n"
        f"config = load_config({str(config)!r})\n"
        "frames = [cell.run_cell(config.to_dict(), c) for c in plan_cells(config) if c.series == 'shared']\n"
        f"import pandas as pd; pd.concat(frames).to_pickle({str(tmp_path / 'timed.pkl')!r})\n")
    subprocess.run([sys.executable, str(check)], check=True, timeout=300)
    timed = pd.read_pickle(tmp_path / "timed.pkl")
    # run_cell sets the configuration's torch threads (1) itself, here and in the subprocess
    cfg = load_config(config)
    plain = pd.concat([run_cell(cfg.to_dict(), c) for c in plan_cells(cfg) if c.series == "shared"])
    pd.testing.assert_frame_equal(timed.reset_index(drop=True), plain.reset_index(drop=True))
