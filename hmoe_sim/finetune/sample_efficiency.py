"""Fine-tuning experiment: sample efficiency of LoRA, MH-LoRA and HoRA students.

A frozen random attention layer (no biases) is the pretrained model. Two *teachers* adapt
its query and value projections:

* ``"shared"`` -- a HoRA update (rank 1, one-dimensional head embeddings): every head's
  factors lie on one line ``A_0 + e_h G^A``, ``B_0 + e_h G^B`` -- low-rank structure shared
  across heads;
* ``"independent"`` -- an MH-LoRA update (rank 1) with independent factors per head.

The regression target is the layer-exact function of theory.md section 5,
``y = u^T MHA_teacher(X)_1 + eps`` with ``X ~ Uniform([-1, 1]^{N E})`` and Gaussian noise.
Students share the frozen base, start from their zero-initialised adapters and are fitted
by full-batch L-BFGS (float64 by default) on the first ``n`` examples of one pool per
(teacher, replicate), so the sizes are nested as in "fraction of the training data". The
score is the noise-free test error ``mean (f_student - f_teacher)^2`` on a fixed test set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.data import cell_seed
from hmoe_sim.hora.attention import ADAPTER_KINDS, MultiHeadAttention
from hmoe_sim.hora.lora import HoRALinear, LoRALinear, MultiHeadLoRALinear
from hmoe_sim.hora.theory_link import layer_regression_function

__all__ = ["TEACHERS", "StudentSpec", "FinetuneConfig", "make_teacher", "make_student", "fit_student",
           "run_sample_efficiency", "config_summary"]

TEACHERS = ("shared", "independent")


@dataclass(frozen=True)
class StudentSpec:
    """Adapter of a student: kind, rank and (for ``hora``) head-embedding dimension."""

    adapter: str
    rank: int
    hyper_dim: int = 1

    def __post_init__(self) -> None:
        check_choice("adapter", self.adapter, ADAPTER_KINDS[1:])
        check_positive_int("rank", self.rank)
        check_positive_int("hyper_dim", self.hyper_dim)

    @property
    def label(self) -> str:
        extra = f", m={self.hyper_dim}" if self.adapter == "hora" else ""
        return f"{self.adapter} (r={self.rank}{extra})"


def _default_students() -> tuple[StudentSpec, ...]:
    return (StudentSpec("lora", 2), StudentSpec("mh-lora", 1), StudentSpec("hora", 1, 2))


@dataclass(frozen=True)
class FinetuneConfig:
    """Sizes of the experiment (defaults: a CPU run of a few minutes).

    Attributes
    ----------
    embed_dim, n_heads, n_tokens : int
        Layer size ``E``, ``H`` and tokens per input ``N``.
    n_grid : tuple of int
        Training-set sizes (nested prefixes of one pool).
    n_seeds : int
        Replicates (data pool and student initialisation) per teacher.
    n_test : int
        Test-set size.
    noise_std : float
        Standard deviation of the label noise.
    teacher_scale : float
        Scale of the teachers' ``B`` factors (sets the size of the adaptation).
    max_iter : int
        L-BFGS iteration cap per fit.
    grad_tol : float
        Gradient tolerance (max-abs) of L-BFGS; fits ending below it count as converged.
    root_seed : int
        Seed of the frozen layer, the teachers, the data and the initialisations.
    students : tuple of StudentSpec
        The students (comparable budgets by default: 128, 160 and 128 parameters).
    """

    embed_dim: int = 16
    n_heads: int = 4
    n_tokens: int = 4
    n_grid: tuple[int, ...] = (50, 100, 200, 400, 800, 1600)
    n_seeds: int = 3
    n_test: int = 4000
    noise_std: float = 0.1
    teacher_scale: float = 2.0
    max_iter: int = 1000
    grad_tol: float = 1e-6
    root_seed: int = 0
    students: tuple[StudentSpec, ...] = field(default_factory=_default_students)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "n_heads", "n_tokens", "n_seeds", "n_test", "max_iter"):
            check_positive_int(name, getattr(self, name))
        if not self.n_grid:
            raise ValueError("n_grid must hold at least one training-set size")
        for n in self.n_grid:
            check_positive_int("n_grid entry", n)
        check_positive_float("noise_std", self.noise_std, allow_zero=True)
        check_positive_float("teacher_scale", self.teacher_scale)
        check_positive_float("grad_tol", self.grad_tol)
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by n_heads={self.n_heads}")


def _seed(config: FinetuneConfig, *key: int | str) -> int:
    return int(cell_seed(config.root_seed, *key).generate_state(1)[0])


def _base(config: FinetuneConfig, spec: StudentSpec | None, seed: int, dtype: torch.dtype,
          device: torch.device) -> MultiHeadAttention:
    """A module whose frozen weights are the experiment's base layer (adapters seeded by ``seed``)."""
    kwargs = {} if spec is None else {"adapter": spec.adapter, "rank": spec.rank, "hyper_dim": spec.hyper_dim}
    module = MultiHeadAttention(config.embed_dim, config.n_heads, bias=False, seed=seed, dtype=dtype, **kwargs)
    frozen = MultiHeadAttention(config.embed_dim, config.n_heads, bias=False, seed=_seed(config, "base"), dtype=dtype)
    with torch.no_grad():
        for name in "qkvo":
            module.base_linear(name).weight.copy_(frozen.base_linear(name).weight)
    return module.to(device)


def make_teacher(config: FinetuneConfig, teacher: str, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> MultiHeadAttention:
    """The base layer plus the teacher's random adaptation of ``W^Q`` and ``W^V``.

    ``A``-type factors get entries ``N(0, 1/E)`` and ``B``-type factors ``N(0, s^2/r)``
    (``s = teacher_scale``), split evenly between the shared and generated parts for HoRA,
    so that ``delta_W`` entries have variance about ``s^2 / E`` in both teachers.
    """
    teacher = check_choice("teacher", teacher, TEACHERS)
    spec = StudentSpec("hora", 1, 1) if teacher == "shared" else StudentSpec("mh-lora", 1)
    module = _base(config, spec, _seed(config, "teacher", teacher), dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(_seed(config, "teacher-values", teacher))
    a_std, b_std = 1 / math.sqrt(config.embed_dim), config.teacher_scale / math.sqrt(spec.rank)

    def fill(p: torch.Tensor, std: float) -> None:
        p.copy_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))

    with torch.no_grad():
        for layer in module.adapters().values():
            if isinstance(layer, HoRALinear):
                fill(layer.shared_A, a_std / math.sqrt(2))
                fill(layer.generator_A, a_std / math.sqrt(2))
                fill(layer.shared_B, b_std / math.sqrt(2))
                fill(layer.generator_B, b_std / math.sqrt(2))
            elif isinstance(layer, LoRALinear | MultiHeadLoRALinear):
                fill(layer.lora_A, a_std)
                fill(layer.lora_B, b_std)
        if module.head_embeddings is not None:
            fill(module.head_embeddings, 1.0)
    return module.to(device)


def make_student(config: FinetuneConfig, spec: StudentSpec, seed: int, *, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> MultiHeadAttention:
    """The base layer with a freshly initialised (zero-``B``) adapter of kind ``spec``."""
    return _base(config, spec, seed, dtype, torch.device(device))


def fit_student(student: MultiHeadAttention, X: torch.Tensor, y: torch.Tensor, readout: torch.Tensor, *,
                max_iter: int = 1000, grad_tol: float = 1e-6) -> dict[str, float | int | bool]:
    """Least squares on the adapter parameters by full-batch L-BFGS (strong Wolfe line search).

    Returns
    -------
    dict
        ``train_mse``, ``grad_max`` (max-abs gradient at the end), ``iterations`` and
        ``converged`` (``grad_max <= grad_tol``).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters (adapter='none')")
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=check_positive_int("max_iter", max_iter),
                            max_eval=2 * max_iter, tolerance_grad=grad_tol, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (layer_regression_function(student, X, readout) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    loss = closure()
    grad_max = max(float(p.grad.abs().max()) for p in params)
    return {"train_mse": float(loss.detach()), "grad_max": grad_max, "iterations": int(opt.state[params[0]]["n_iter"]),
            "converged": bool(grad_max <= grad_tol)}


def run_sample_efficiency(config: FinetuneConfig, *, teachers: Sequence[str] = TEACHERS,
                          dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                          progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Fit every student on every nested training size; one row per fit.

    Columns: ``teacher, adapter, label, rank, hyper_dim, n_params, n, seed, test_mse,
    base_test_mse, relative_test_error, train_mse, grad_max, iterations, converged,
    seconds`` (``base_test_mse`` is the error of the un-adapted base layer).
    """
    device = torch.device(device)
    rows: list[dict[str, object]] = []
    n_max = max(config.n_grid)
    for teacher_name in teachers:
        teacher = make_teacher(config, teacher_name, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(_seed(config, "test", teacher_name))
        d = config.n_tokens * config.embed_dim
        readout = torch.randn(config.embed_dim, generator=gen, dtype=dtype).to(device)
        X_test = (torch.rand((config.n_test, d), generator=gen, dtype=dtype) * 2 - 1).to(device)
        with torch.no_grad():
            f_test = layer_regression_function(teacher, X_test, readout)
            base = _base(config, None, 0, dtype, device)
            base_mse = float((layer_regression_function(base, X_test, readout) - f_test).pow(2).mean())
        for rep in range(config.n_seeds):
            gen = torch.Generator().manual_seed(_seed(config, "data", teacher_name, rep))
            X_pool = (torch.rand((n_max, d), generator=gen, dtype=dtype) * 2 - 1).to(device)
            noise = (config.noise_std * torch.randn(n_max, generator=gen, dtype=dtype)).to(device)
            with torch.no_grad():
                y_pool = layer_regression_function(teacher, X_pool, readout) + noise
            for spec in config.students:
                for n in config.n_grid:
                    start = time.perf_counter()
                    student = make_student(config, spec, _seed(config, "init", spec.label, rep), dtype=dtype,
                                           device=device)
                    fit = fit_student(student, X_pool[:n], y_pool[:n], readout, max_iter=config.max_iter,
                                      grad_tol=config.grad_tol)
                    with torch.no_grad():
                        test_mse = float((layer_regression_function(student, X_test, readout) - f_test).pow(2).mean())
                    rows.append({"teacher": teacher_name, "adapter": spec.adapter, "label": spec.label,
                                 "rank": spec.rank, "hyper_dim": spec.hyper_dim,
                                 "n_params": student.trainable_parameters()["total"], "n": n, "seed": rep,
                                 "test_mse": test_mse, "base_test_mse": base_mse,
                                 "relative_test_error": test_mse / base_mse, **fit,
                                 "seconds": time.perf_counter() - start})
                    if progress is not None:
                        progress(f"{teacher_name:11s} {spec.label:18s} n={n:6d} seed={rep} test_mse={test_mse:.3e} "
                                 f"iters={fit['iterations']} conv={fit['converged']}")
    return pd.DataFrame(rows)


def config_summary(config: FinetuneConfig) -> dict[str, object]:
    """The configuration as plain values (for logs and CSV headers)."""
    out = asdict(config)
    out["students"] = [s.label for s in config.students]
    out["n_grid"] = list(config.n_grid)
    return out

