"""The pretrained experiment's logic without the model (issue 21): fitting rules, resume, noise, teachers, CIs.

The fits run on a linear stand-in for ``TopLayers`` (``embed`` = masked mean of a linear map),
so their optimum is an ordinary least-squares solution computed independently.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hmoe_sim.finetune.embedding_fit import (
    early_stopping_done,
    fit_embeddings,
    fit_embeddings_adam,
    gradient_converged,
)
from hmoe_sim.finetune.pretrained_experiment import (
    COLUMNS,
    FitKey,
    PretrainedFinetuneConfig,
    add_noise,
    make_teacher,
    noise_sd,
    pending_fits,
    pending_pilot,
    plan_fits,
    plan_pilot,
    select_learning_rates,
)
from hmoe_sim.finetune.pretrained_report import bootstrap_mean_ci, paired_differences
from hmoe_sim.finetune.sample_efficiency import StudentSpec
from hmoe_sim.hora.lora import AdapterLinear

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


class _LinearStudent(nn.Module):
    """``embed(hidden, mask)`` = masked token mean of ``hidden @ W.T``: least squares in ``W``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dim, dtype=F64))

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = mask.to(hidden.dtype)[..., None]
        return ((hidden @ self.weight.T) * w).sum(-2) / w.sum(-2)


def _problem(n: int, dim: int = 3, tokens: int = 4, noise: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, tokens, dim, generator=gen, dtype=F64)
    mask = torch.ones(n, tokens, dtype=torch.long)
    mask[::2, -1] = 0  # some padding
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    truth = torch.randn(dim, dim, generator=gen, dtype=F64)
    targets = pooled @ truth.T + noise * torch.randn(n, dim, generator=gen, dtype=F64)
    return hidden, mask, pooled, targets


def _chunks(hidden, mask, rows, size=5):
    return [(torch.arange(s, min(s + size, len(rows))), hidden[rows[s:s + size]], mask[rows[s:s + size]])
            for s in range(0, len(rows), size)]


# ---------------------------------------------------------------------- fitting rules


def test_gradient_rule_and_lbfgs_reach_the_least_squares_solution():
    assert gradient_converged(1e-4, 1.0, 1e-3) and not gradient_converged(2e-3, 1.0, 1e-3)
    hidden, mask, pooled, targets = _problem(40)
    student = _LinearStudent(3)
    fit = fit_embeddings(student, _chunks(hidden, mask, torch.arange(40)), targets, grad_rtol=1e-8)
    assert fit["converged"] and fit["stop"] == "gradient" and fit["grad_max"] <= 1e-8 * fit["grad_start"]
    expected = torch.linalg.lstsq(pooled, targets).solution.T  # targets ~ pooled @ W.T
    assert torch.allclose(student.weight.detach(), expected, atol=1e-6)
    residual = float((pooled @ expected.T - targets).pow(2).mean())
    assert fit["train_mse"] == pytest.approx(residual, rel=1e-8)
    capped = fit_embeddings(_LinearStudent(3), _chunks(hidden, mask, torch.arange(40)), targets, max_iter=1,
                            grad_rtol=1e-12)
    assert capped["stop"] == "cap" and not capped["converged"] and capped["iterations"] == 1


def test_early_stopping_rule_hand_cases():
    assert not early_stopping_done([5.0, 4.0, 4.5], 2, 1e-3)  # only 3 checks: not more than patience + 0
    assert early_stopping_done([5.0, 4.0, 4.5, 4.2], 2, 1e-3)  # the last 2 never beat 4.0
    assert not early_stopping_done([5.0, 4.0, 4.5, 3.99], 2, 1e-3)  # 3.99 < 4.0 * (1 - 1e-3) = 3.996
    assert early_stopping_done([5.0, 4.0, 4.5, 3.997], 2, 1e-3)  # an improvement below the relative threshold


def test_adam_early_stopping_restores_the_best_validation_point():
    hidden, mask, _, targets = _problem(60, noise=0.5)
    train, val = torch.arange(24), torch.arange(24, 60)
    student = _LinearStudent(3)
    fit = fit_embeddings_adam(student, lambda rows: _chunks(hidden, mask, train[rows]), 24, targets[train],
                              _chunks(hidden, mask, val), targets[val], lr=0.05, batch_size=8, max_steps=5000,
                              eval_every=5, patience=20, seed=1)
    assert fit["converged"] and fit["stop"] == "early" and fit["iterations"] < 5000
    assert fit["best_step"] % 5 == 0 and fit["best_step"] <= fit["iterations"]
    with torch.no_grad():
        val_now = float((student.embed(hidden[val], mask[val]) - targets[val]).pow(2).mean())
        train_now = float((student.embed(hidden[train], mask[train]) - targets[train]).pow(2).mean())
    assert val_now == pytest.approx(fit["val_mse"], rel=1e-12)  # the restored parameters are the best ones
    assert train_now == pytest.approx(fit["train_mse"], rel=1e-12)
    assert fit["val_mse"] < fit["val_start"]
    assert fit["evaluations"] == pytest.approx(fit["iterations"] * 8 / 24)  # passes over the training set
    capped = fit_embeddings_adam(_LinearStudent(3), lambda rows: _chunks(hidden, mask, train[rows]), 24,
                                 targets[train], _chunks(hidden, mask, val), targets[val], lr=0.05, max_steps=3)
    assert capped["stop"] == "cap" and not capped["converged"] and capped["iterations"] == 3


# ---------------------------------------------------------------------- plan, resume, learning rates


def _config(**kw):
    return PretrainedFinetuneConfig(n_grid=(4, 8), n_seeds=2, lr_grid=(1e-3, 1e-2), **kw)


def test_plan_is_seed_major_and_resume_skips_finished_fits():
    config = _config()
    plan = plan_fits(config)
    assert len(plan) == 2 * 2 * 3 * 2
    assert [k.seed for k in plan] == [0] * 12 + [1] * 12
    assert plan[:3] == [FitKey("shared", "lora", 4, 0), FitKey("shared", "lora", 8, 0),
                        FitKey("shared", "mh-lora", 4, 0)]
    done = pd.DataFrame([plan[0]._asdict(), plan[5]._asdict(), {**plan[13]._asdict(), "test_mse": 1.0}])
    rest = pending_fits(plan, done)
    assert rest == [k for i, k in enumerate(plan) if i not in (0, 5, 13)]
    assert pending_fits(plan, None) == plan
    with pytest.raises(ValueError, match="key columns"):
        pending_fits(plan, pd.DataFrame({"teacher": ["shared"]}))


def test_pilot_plan_resume_and_learning_rate_choice():
    config = _config()
    pilot = plan_pilot(config, ["shared"])
    assert len(pilot) == 3 * 2 and {key.n for key, _ in pilot} == {config.pilot_n}
    done = pd.DataFrame([{"teacher": "shared", "adapter": "lora", "lr": 0.01}])
    assert [(k.adapter, lr) for k, lr in pending_pilot(pilot, done)] == [
        ("lora", 1e-3), ("mh-lora", 1e-3), ("mh-lora", 1e-2), ("hora", 1e-3), ("hora", 1e-2)]
    table = pd.DataFrame({"teacher": ["shared"] * 4, "adapter": ["lora", "lora", "hora", "hora"],
                          "lr": [1e-3, 1e-2, 1e-2, 1e-3], "val_mse": [2.0, 1.0, 3.0, 3.0]})
    assert select_learning_rates(table) == {("shared", "lora"): 1e-2, ("shared", "hora"): 1e-3}  # tie: smaller


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_pretrained_script",
                                                  ROOT / "experiments" / "finetune_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_appends_rows_and_a_rerun_skips_them(tmp_path, monkeypatch):
    script = _load_script()
    calls: list[tuple[FitKey, float]] = []

    class FakeExperiment:
        def __init__(self, config, **_):
            self.config = config

        def fit(self, key, lr):
            calls.append((key, lr))
            row = dict.fromkeys(COLUMNS, 0.0)
            row.update(key._asdict(), lr=lr, label=key.adapter, stop="early", converged=True, iterations=1,
                       evaluations=1.0, n_params=10, test_mse=1e-3 * (1 + lr + key.seed),
                       val_mse=1.0 / (1 + 100 * lr) if key.adapter == "hora" else lr)
            return row

    monkeypatch.setattr(script, "PretrainedExperiment", FakeExperiment)
    monkeypatch.setattr(script, "report", lambda *a, **k: None)
    out = tmp_path / "t.csv"
    argv = ["--out", str(out), "--n-grid", "4", "8", "--seeds", "2", "--lr-grid", "0.001", "0.01"]
    script.main(argv)
    first = pd.read_csv(out)
    pilot = pd.read_csv(tmp_path / "t_lr_pilot.csv")
    assert len(first) == 24 and len(pilot) == 12 and len(calls) == 36
    chosen = first.groupby("adapter")["lr"].unique()
    assert chosen["hora"].tolist() == [0.01] and chosen["lora"].tolist() == [0.001]  # lowest val_mse
    # a cut last line (killed while writing) is dropped; the rerun redoes that fit only
    text = out.read_text()
    out.write_text(text[:text.rstrip("\n").rfind("\n") + 1] + "shared,hora,0.")
    calls.clear()
    script.main(argv)
    assert len(calls) == 1 and calls[0][0] == FitKey(*first.iloc[-1][["teacher", "adapter", "n", "seed"]])
    assert len(pd.read_csv(out)) == 24
    with pytest.raises(SystemExit, match="another configuration"):
        script.main([*argv[:-2], "0.001", "0.03"])


# ---------------------------------------------------------------------- noise and teachers


def test_noise_has_the_stated_signal_to_noise_ratio():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4000, 8, generator=gen, dtype=F64)
    teacher = base + 0.3 * torch.randn(4000, 8, generator=gen, dtype=F64)
    assert noise_sd(base + 2.0, base, 4.0) == pytest.approx(1.0)  # update 2 everywhere: 4 / 1 = snr 4
    assert noise_sd(teacher, base, math.inf) == 0.0
    sd = noise_sd(teacher, base, 2.5)
    noisy = add_noise(teacher, sd, seed=5)
    measured = float((teacher - base).pow(2).mean() / (noisy - teacher).pow(2).mean())
    assert measured == pytest.approx(2.5, rel=0.03)  # 32000 draws: the noise power is within ~1.6% (2 SE)
    assert torch.equal(add_noise(teacher, sd, seed=5), noisy) and not torch.equal(add_noise(teacher, sd, 6), noisy)
    with pytest.raises(ValueError, match="snr"):
        noise_sd(teacher, base, 0.0)


class _SelfAttention(nn.Module):
    num_attention_heads = 12

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim, dtype=F64) for _ in range(3))


class _Base(nn.Module):
    """One BERT-style attention block with 12 heads of 4 and a ``config.hidden_size``."""

    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.config = type("Config", (), {"hidden_size": dim})()
        self.block = _SelfAttention(dim)


def _singular_values(spec: StudentSpec) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    teacher = make_teacher(_Base(), spec, scale=1.0, seed=4)
    full, per_head = [], []
    for layer in teacher.modules():
        if isinstance(layer, AdapterLinear):
            delta = layer.get_delta_weight().detach()
            full.append(torch.linalg.svdvals(delta))
            per_head.append(torch.stack([torch.linalg.svdvals(block) for block in delta.split(4, dim=0)]))
    assert len(full) == 2  # query and value
    return full, per_head


def _rank(sv: torch.Tensor) -> int:
    return int((sv > 1e-10 * sv.max()).sum())


def test_shared_teacher_is_outside_lora_rank_6_and_mh_lora_rank_1():
    full, per_head = _singular_values(StudentSpec("hora", 2, 5))
    for sv, heads in zip(full, per_head, strict=True):
        assert _rank(sv) == 12  # (m + 1) r = 12 directions shared by the heads
        lora_floor = float(sv[6:].pow(2).sum() / sv.pow(2).sum())  # Eckart-Young: best rank-6 error
        assert lora_floor > 0.05
        assert all(_rank(h) == 2 for h in heads)  # rank 2 per head: MH-LoRA at rank 1 cannot represent it
    independent, heads_ind = _singular_values(StudentSpec("mh-lora", 1))
    assert all(_rank(sv) == 12 for sv in independent) and all(_rank(h) == 1 for hs in heads_ind for h in hs)
    old, _ = _singular_values(StudentSpec("hora", 1, 1))  # issue 14's shared teacher: inside LoRA rank 6
    assert all(_rank(sv) == 2 for sv in old)


# ---------------------------------------------------------------------- paired differences


def test_bootstrap_interval_hand_cases():
    assert bootstrap_mean_ci([2.5, 2.5, 2.5]) == (2.5, 2.5)
    # two values: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_mean_ci([0.0, 1.0], n_boot=20_000) == (0.0, 1.0)
    assert bootstrap_mean_ci([0.0, 1.0], n_boot=20_000, level=0.4) == (0.5, 0.5)  # 30% and 70% quantiles
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci([1.0], level=1.0)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci([1.0, np.nan])


def test_paired_differences_pair_by_seed():
    rows = []
    for seed, (hora, lora, mh) in enumerate([(1.0, 2.0, 1.5), (3.0, 3.5, 2.0), (2.0, 2.0, 1.0)]):
        for adapter, value in (("hora", hora), ("lora", lora), ("mh-lora", mh)):
            rows.append({"teacher": "shared", "adapter": adapter, "n": 16, "seed": seed, "test_mse": value})
    rows.append({"teacher": "shared", "adapter": "hora", "n": 16, "seed": 3, "test_mse": 9.0})  # unpaired
    out = paired_differences(pd.DataFrame(rows), n_boot=2000).set_index("comparison")
    lora = out.loc["hora - lora"]
    assert lora["n_seeds"] == 3 and lora["mean_diff"] == pytest.approx((-1.0 - 0.5 + 0.0) / 3)
    assert lora["reference_mean"] == pytest.approx(2.0) and lora["other_mean"] == pytest.approx(2.5)
    assert lora["frac_reference_lower"] == pytest.approx(2 / 3)
    assert -1.0 <= lora["ci_low"] <= lora["mean_diff"] <= lora["ci_high"] <= 0.0
    mh = out.loc["hora - mh-lora"]
    assert mh["mean_diff"] == pytest.approx((-0.5 + 1.0 + 1.0) / 3)
    assert mh["relative_diff"] == pytest.approx(mh["mean_diff"] / 1.5)


def test_optimiser_columns_join_by_teacher_student_and_n():
    from hmoe_sim.finetune.pretrained_report import with_optimiser_columns

    summary = pd.DataFrame({"teacher": ["shared", "shared"], "adapter": ["hora", "lora"], "n": [256, 256],
                            "test_mse": [1.0, 2.0]})
    check = pd.DataFrame([
        {"teacher": "shared", "adapter": "hora", "n": 256, "start": s, "stage": g, "n_seeds": 2,
         "train_mse": t, "test_mse": v, "certified": c}
        for s, g, t, v, c in [("default", "adam", 3.0, 1.1, np.nan), ("default", "polish", 2.5, 1.3, 0.5),
                              ("oracle", "adam", 2.4, 0.2, np.nan), ("oracle", "polish", 2.3, 0.4, 1.0)]])
    out = with_optimiser_columns(summary, check)
    hora, lora = out.iloc[0], out.iloc[1]
    assert (hora["check_seeds"], hora["check_adam_test_mse"], hora["polish_test_mse"], hora["polish_certified"],
            hora["oracle_test_mse"], hora["oracle_polish_train_mse"]) == (2, 1.1, 1.3, 0.5, 0.2, 2.3)
    assert lora[["polish_test_mse", "oracle_test_mse", "check_seeds"]].isna().all()
    assert list(out.columns[:4]) == list(summary.columns)
