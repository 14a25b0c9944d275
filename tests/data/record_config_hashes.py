"""Regenerate the tests/data/config_hashes.json entries of configs changed on purpose.

Usage (from the repository root): ``python tests/data/record_config_hashes.py NAME.toml ...``; say in the
commit which configs changed their protocol and why (every stored cell of them is recomputed).
"""
import json
import sys
from pathlib import Path

from hmoe_sim.sweep import load_config, plan_cells
from hmoe_sim.sweep.cells import cell_hash

p = Path("tests/data/config_hashes.json")
data = json.loads(p.read_text())
for name in sys.argv[1:]:
    c = load_config(Path("experiments/configs") / name)
    data[name] = {"fingerprint": c.fingerprint, "cells": {cell.key: cell_hash(c, cell) for cell in plan_cells(c)}}
    print("regenerated", name, c.fingerprint)
p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
