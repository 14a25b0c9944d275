"""The fine-tuning experiment's core (tiny sizes) and its figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hmoe_sim.finetune.sample_efficiency import (
    FinetuneConfig,
    StudentSpec,
    fit_student,
    make_student,
    make_teacher,
    run_sample_efficiency,
)
from hmoe_sim.hora import HoRALinear, MultiHeadLoRALinear, adapter_parameter_count, layer_regression_function

TINY = dict(embed_dim=4, n_heads=2, n_tokens=2, n_grid=(20, 60), n_seeds=2, n_test=200, max_iter=40)


def test_table_columns_counts_and_reproducibility() -> None:
    config = FinetuneConfig(**TINY)
    table = run_sample_efficiency(config)
    assert len(table) == 2 * 3 * 2 * 2  # teachers x students x sizes x seeds
    for spec in config.students:
        counts = table.loc[table["label"] == spec.label, "n_params"].unique()
        assert counts.tolist() == [adapter_parameter_count(spec.adapter, 4, 2, spec.rank, hyper_dim=spec.hyper_dim)]
    assert np.isfinite(table[["test_mse", "train_mse", "base_test_mse"]].to_numpy()).all()
    assert table.groupby("teacher")["base_test_mse"].nunique().eq(1).all()
    again = run_sample_efficiency(config, teachers=("independent",))
    mine = table[table["teacher"] == "independent"].reset_index(drop=True)
    np.testing.assert_array_equal(again["test_mse"].to_numpy(), mine["test_mse"].to_numpy())


def test_teachers_have_the_announced_structure() -> None:
    config = FinetuneConfig(**TINY)
    shared = make_teacher(config, "shared")
    independent = make_teacher(config, "independent")
    assert isinstance(shared.q_proj, HoRALinear) and shared.q_proj.hyper_dim == 1 and shared.q_proj.rank == 1
    assert isinstance(independent.v_proj, MultiHeadLoRALinear) and independent.v_proj.rank == 1
    # same frozen base, nonzero adaptation of Q and V only
    for name in "qkvo":
        assert torch.equal(shared.base_linear(name).weight, independent.base_linear(name).weight)
    for teacher in (shared, independent):
        assert teacher.effective_weight("q").sub(teacher.base_linear("q").weight).abs().max() > 0.1
        assert teacher.effective_weight("k").equal(teacher.base_linear("k").weight)
    with pytest.raises(ValueError, match="unknown teacher"):
        make_teacher(config, "mixed")


def test_well_specified_student_recovers_the_teacher_function() -> None:
    """Noise-free data from the independent teacher: an MH-LoRA student of the same rank fits it."""
    config = FinetuneConfig(**{**TINY, "noise_std": 0.0})
    teacher = make_teacher(config, "independent")
    gen = torch.Generator().manual_seed(0)
    X = torch.rand((300, 8), generator=gen, dtype=torch.float64) * 2 - 1
    u = torch.randn(4, generator=gen, dtype=torch.float64)
    y = layer_regression_function(teacher, X, u).detach()
    student = make_student(config, StudentSpec("mh-lora", 1), seed=3)
    before = (layer_regression_function(student, X, u) - y).pow(2).mean().item()
    fit = fit_student(student, X, y, u, max_iter=500, grad_tol=1e-9)
    assert fit["train_mse"] < 1e-8 * before
    assert math.isfinite(fit["grad_max"]) and fit["iterations"] > 0


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        FinetuneConfig(embed_dim=6, n_heads=4)
    with pytest.raises(ValueError, match="n_grid"):
        FinetuneConfig(n_grid=())
    with pytest.raises(ValueError, match="unknown adapter 'none'"):
        StudentSpec("none", 1)


def test_figure_has_one_panel_per_teacher_and_counts_in_legend() -> None:
    import pandas as pd

    from hmoe_sim.plotting import plot_finetune_sample_efficiency

    rows = [{"teacher": t, "label": lab, "n_params": p, "n": n, "seed": s, "test_mse": 1.0 / n + 0.01 * s,
             "base_test_mse": 0.5}
            for t in ("shared", "independent") for lab, p in (("lora (r=2)", 128), ("hora (r=1, m=2)", 128))
            for n in (10, 100) for s in range(3)]
    fig = plot_finetune_sample_efficiency(pd.DataFrame(rows))
    axes = fig.get_axes()
    assert len(axes) == 2
    texts = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert "lora (r=2): 128 params" in texts and axes[0].get_xscale() == "log"
