"""Sample efficiency of LoRA, MH-LoRA and HoRA students on a real pretrained transformer (issues 14, 21).

The toy experiment of :mod:`hmoe_sim.finetune.sample_efficiency`, repeated on all-MiniLM-L6-v2 with real
English sentences (the ``pydoc_data`` corpus of :func:`hmoe_sim.hora.pretrained.load_sentences`):

* **Base**: MiniLM, frozen. Adapters go on the query and value projections of the last
  ``n_adapted_layers`` encoder layers; the hidden states entering the first adapted layer are
  computed once by the frozen model (:class:`~hmoe_sim.hora.pretrained.TopLayers`).
* **Teachers**: the base plus a hidden update of Q and V on the adapted layers, each the
  structure of one student family (:func:`make_teacher`): ``"shared"`` a HoRA update (default
  rank 2, head embeddings of dimension 5: all heads' factors generated from one shared
  hypernetwork; Q and V updates of rank 12, so LoRA at rank 6 cannot represent it, and of rank 2
  per head, so MH-LoRA at rank 1 cannot either); ``"independent"`` an MH-LoRA update (rank 1,
  independent factors per head: rank 12). The scale is solved for so that the teacher moves the
  mean-pooled embeddings of the first ``n_calibration`` training sentences by ``teacher_shift``
  (:func:`embedding_shift`).
* **Targets**: the teacher's mean-pooled last hidden states plus Gaussian noise at a stated
  signal-to-noise ratio ``snr`` (:func:`noise_sd`: the update's mean square over the noise
  variance, per coordinate, measured on the calibration sentences).
* **Students**: the base with freshly injected ``lora`` / ``mh-lora`` / ``hora`` adapters (zero
  ``B``), fitted by mini-batch Adam with early stopping on a fixed validation set of
  ``n_validation`` training sentences (never in a pool; noisy targets too), restoring the best
  validation point (:func:`~hmoe_sim.finetune.embedding_fit.fit_embeddings_adam`), on the first
  ``n`` sentences of one shuffled pool per seed (nested sizes). The learning rate of each
  (teacher, student) is chosen from ``lr_grid`` by the validation MSE of pilot fits at
  ``n = pilot_n`` on a seed of their own (:func:`plan_pilot`, :func:`select_learning_rates`).
* **Scores**: MSE (per coordinate) and mean cosine to the noise-free teacher on the test split;
  training and validation MSE against the noisy targets.

One fit is one :class:`FitKey` ``(teacher, adapter, n, seed)``; :func:`plan_fits` orders them
seed-major and :func:`pending_fits` leaves out finished ones, so a run can be resumed.
Every fit's result depends on its key and the configuration only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.data import cell_seed
from hmoe_sim.finetune.embedding_fit import fit_embeddings_adam
from hmoe_sim.finetune.peft_students import peft_student, trainable_count
from hmoe_sim.finetune.pretrained_plan import (
    PILOT_SEED,
    TEACHERS,
    FitKey,
    pending_fits,
    pending_pilot,
    plan_fits,
    plan_pilot,
    select_learning_rates,
)
from hmoe_sim.finetune.pretrained_teachers import add_noise, embedding_shift, make_teacher, noise_sd
from hmoe_sim.finetune.sample_efficiency import StudentSpec
from hmoe_sim.hora.pretrained import TopLayers, hidden_states_before, load_minilm, load_sentences, tokenize

__all__ = ["COLUMNS", "PILOT_SEED", "TEACHERS", "EncodedSentences", "FitKey", "FitSetup", "PretrainedExperiment",
           "PretrainedFinetuneConfig", "add_noise", "config_summary", "embedding_shift", "encode_sentences",
           "make_teacher", "noise_sd", "pending_fits", "pending_pilot", "plan_fits", "plan_pilot",
           "run_pretrained_sample_efficiency", "select_learning_rates"]

#: the columns of one fit's row, in order (the CSV header of the experiment's table)
COLUMNS = ("teacher", "teacher_label", "teacher_scale", "teacher_shift", "snr", "noise_sd", "adapter", "label",
           "rank", "hyper_dim", "n_params", "n", "seed", "test_mse", "base_test_mse", "relative_test_error",
           "test_cosine", "base_test_cosine", "lr", "train_mse", "val_mse", "val_start", "base_val_mse", "best_step",
           "iterations", "evaluations", "stop", "converged", "seconds")


def _default_students() -> tuple[StudentSpec, ...]:
    # Budgets per adapted layer (Q and V): lora r=6 9216, mh-lora r=1 9984, hora r=2 m=5 9984 + 60.
    return (StudentSpec("lora", 6), StudentSpec("mh-lora", 1), StudentSpec("hora", 2, 5))


@dataclass(frozen=True)
class PretrainedFinetuneConfig:
    """Sizes of the pretrained-model experiment (defaults: the CPU run of ``experiments/finetune_pretrained.py``).

    Attributes
    ----------
    n_adapted_layers : int
        Adapters on the Q and V projections of this many last encoder layers.
    max_tokens : int
        Sentences with more tokens (``[CLS]`` and ``[SEP]`` included) are left out.
    n_grid : tuple of int
        Training-set sizes in sentences (nested prefixes of one shuffled pool per seed).
    n_seeds : int
        Replicates (training pool, target noise and student initialisation).
    n_test : int
        Test sentences (the first ones of the test split that fit ``max_tokens``).
    n_validation : int
        Validation sentences: the last ones of the training split, never drawn into a pool.
    teacher_shift : float
        Size of the teacher's update: :func:`embedding_shift` of its embeddings from the base's.
    snr : float
        Signal-to-noise ratio of the targets (:func:`noise_sd`); ``inf`` for noise-free targets.
    n_calibration : int
        The shift and the noise level are measured on the first this many training sentences (a
        fixed set, so the teacher does not depend on ``n_grid`` or ``n_seeds``).
    lr_grid : tuple of float
        Adam learning rates tried per (teacher, student) in the pilot (:func:`plan_pilot`).
    pilot_n : int
        Training-set size of the pilot fits.
    batch_size, max_steps, eval_every, patience, min_rel_improvement
        Of :func:`~hmoe_sim.finetune.embedding_fit.fit_embeddings_adam` (a fit has converged when
        early stopping ended it before ``max_steps``).
    chunk_size : int
        Sentences per forward pass (length-sorted chunks, to cut padding).
    root_seed : int
        Seed of the teachers, pools, noise and student initialisations.
    students : tuple of StudentSpec
        The students (default: budgets as close as the ranks allow, see the module's notes).
        Their adapter kinds must differ (a fit is keyed by the kind).
    shared_teacher, independent_teacher : StudentSpec
        Structure of the two teachers' updates (default: HoRA r=2, m=5 and MH-LoRA r=1).
    corpus : str
        ``"pydoc"`` (the default corpus) or ``"large"`` (the pool adds the standard library's
        docstring sentences, ``load_sentences("train", "modules")``; validation and test sentences
        stay the pydoc ones).
    """

    n_adapted_layers: int = 1
    max_tokens: int = 32
    n_grid: tuple[int, ...] = (16, 64, 256)
    n_seeds: int = 10
    n_test: int = 256
    n_validation: int = 128
    teacher_shift: float = 0.5
    snr: float = 4.0
    n_calibration: int = 256
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    pilot_n: int = 64
    batch_size: int = 32
    max_steps: int = 3000
    eval_every: int = 10
    patience: int = 10
    min_rel_improvement: float = 1e-3
    chunk_size: int = 128
    root_seed: int = 0
    students: tuple[StudentSpec, ...] = field(default_factory=_default_students)
    shared_teacher: StudentSpec = StudentSpec("hora", 2, 5)
    independent_teacher: StudentSpec = StudentSpec("mh-lora", 1)
    corpus: str = "pydoc"

    def __post_init__(self) -> None:
        for name in ("n_adapted_layers", "max_tokens", "n_seeds", "n_test", "n_validation", "n_calibration",
                     "pilot_n", "batch_size", "max_steps", "eval_every", "patience", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        if not self.n_grid:
            raise ValueError("n_grid must hold at least one training-set size")
        for n in self.n_grid:
            check_positive_int("n_grid entry", n)
        check_positive_float("teacher_shift", self.teacher_shift)
        if not self.lr_grid:
            raise ValueError("lr_grid must hold at least one learning rate")
        for lr in self.lr_grid:
            check_positive_float("lr_grid entry", lr)
        check_positive_float("min_rel_improvement", self.min_rel_improvement)
        if not (isinstance(self.snr, int | float) and self.snr > 0):
            raise ValueError(f"snr must be a positive number (inf: no noise), got {self.snr!r}")
        if not self.students:
            raise ValueError("students must hold at least one StudentSpec")
        kinds = [s.adapter for s in self.students]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"students must have distinct adapter kinds, got {kinds}")
        check_choice("corpus", self.corpus, ("pydoc", "large"))

    def teacher_spec(self, teacher: str) -> StudentSpec:
        """The structure of teacher ``"shared"`` or ``"independent"``."""
        teacher = check_choice("teacher", teacher, TEACHERS)
        return self.shared_teacher if teacher == "shared" else self.independent_teacher


def config_summary(config: PretrainedFinetuneConfig) -> dict[str, object]:
    """The configuration as plain JSON values (for logs and the resume check)."""
    out = asdict(config)
    out["students"] = [s.label for s in config.students]
    out["shared_teacher"] = config.shared_teacher.label
    out["independent_teacher"] = config.independent_teacher.label
    out["n_grid"] = list(config.n_grid)
    out["lr_grid"] = list(config.lr_grid)
    out["snr"] = "inf" if math.isinf(config.snr) else float(config.snr)
    return out


def _seed(config: PretrainedFinetuneConfig, *key: int | str) -> int:
    return int(cell_seed(config.root_seed, *key).generate_state(1)[0])


@dataclass(frozen=True)
class EncodedSentences:
    """Hidden states entering the first adapted layer, for a list of sentences.

    Attributes
    ----------
    hidden : torch.Tensor
        ``(S, T, E)``, padded to the longest sentence.
    mask : torch.Tensor
        ``(S, T)`` attention mask (1 on real tokens).
    """

    hidden: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def chunks(self, index: torch.Tensor, chunk_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(positions, hidden, mask)`` per chunk of ``index``, length-sorted and trimmed to each chunk's longest.

        ``positions`` are the rows of ``index`` (so targets are ``targets[positions]``).
        """
        lengths = self.mask[index].sum(-1)
        order = torch.argsort(lengths, stable=True)
        out = []
        for start in range(0, len(order), chunk_size):
            pos = order[start:start + chunk_size]
            rows = index[pos]
            width = int(lengths[pos].max())
            out.append((pos, self.hidden[rows, :width], self.mask[rows, :width]))
        return out


def encode_sentences(model: nn.Module, tokenizer: Any, sentences: Sequence[str], first_layer: int, *,
                     max_tokens: int = 32) -> EncodedSentences:
    """Tokenise (truncating at ``max_tokens``) and run the frozen layers below ``first_layer`` once."""
    device = next(model.parameters()).device
    ids, mask = tokenize(tokenizer, sentences, max_tokens=max_tokens, device=device)
    return EncodedSentences(hidden_states_before(model, ids, mask, first_layer), mask)


@torch.no_grad()
def _embed_all(module: nn.Module, data: EncodedSentences, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    out = torch.empty((len(index), data.hidden.shape[-1]), dtype=data.hidden.dtype, device=data.hidden.device)
    for pos, hidden, mask in data.chunks(index, chunk_size):
        out[pos] = module.embed(hidden, mask)
    return out


def _filter_by_tokens(tokenizer: Any, sentences: Sequence[str], max_tokens: int) -> list[str]:
    lengths = [len(ids) for ids in tokenizer(list(sentences))["input_ids"]]
    return [s for s, n in zip(sentences, lengths, strict=True) if n <= max_tokens]


def _calibrated_teacher(base: TopLayers, spec: StudentSpec, seed: int, data: EncodedSentences, index: torch.Tensor,
                        base_emb: torch.Tensor, target: float, chunk_size: int) -> tuple[nn.Module, float, float]:
    """Solve ``embedding_shift(teacher) = target`` for the scale (fixed-point on the log scale, 1e-3 relative)."""
    scale = 1.0
    for _ in range(40):
        module = make_teacher(base, spec, scale=scale, seed=seed)
        shift = embedding_shift(_embed_all(module, data, index, chunk_size), base_emb)
        if abs(shift / target - 1) < 1e-3:
            return module, scale, shift
        scale *= target / shift
    raise RuntimeError(f"teacher {spec.label}: no scale gives embedding shift {target} (last {shift:.4g} at "
                       f"scale {scale:.4g})")


@dataclass
class _Teacher:
    scale: float
    shift: float
    noise_sd: float
    train: torch.Tensor  # noise-free embeddings of every training sentence
    test: torch.Tensor
    base_test_mse: float
    base_test_cosine: float


@dataclass
class FitSetup:
    """What one fit works on: its key, student spec, teacher, noisy targets and training rows."""

    key: FitKey
    spec: StudentSpec
    teacher_module: nn.Module
    info: _Teacher
    targets: torch.Tensor  # noisy targets of the n training sentences
    val_targets: torch.Tensor
    rows: torch.Tensor  # the training sentences (rows of the encoded training split)


class PretrainedExperiment:
    """The data, base model and teachers of one configuration; :meth:`fit` runs one :class:`FitKey`.

    Building it loads MiniLM (unless given), encodes the corpus once and calibrates teachers on
    first use. The result of :meth:`fit` depends on the key and the configuration only, not on
    which fits ran before in this process.

    Parameters
    ----------
    config : PretrainedFinetuneConfig
    dtype, device
        Of the model and all computations.
    model, tokenizer : optional
        A loaded MiniLM (:func:`~hmoe_sim.hora.pretrained.load_minilm`); loaded when omitted.
    progress : callable, optional
        Receives one line per teacher calibration.
    """

    def __init__(self, config: PretrainedFinetuneConfig, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", model: nn.Module | None = None, tokenizer: Any = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.progress = progress
        device = torch.device(device)
        if model is None or tokenizer is None:
            model, tokenizer = load_minilm(dtype=dtype, device=device)
        model = model.to(device=device, dtype=dtype)
        n_layers = len(model.encoder.layer)
        if config.n_adapted_layers > n_layers:
            raise ValueError(f"n_adapted_layers={config.n_adapted_layers} exceeds the model's {n_layers} layers")
        first = n_layers - config.n_adapted_layers
        train = _filter_by_tokens(tokenizer, load_sentences("train"), config.max_tokens)
        if config.corpus == "large":  # pool: pydoc then module sentences; validation: pydoc's last ones, as before
            extra = _filter_by_tokens(tokenizer, load_sentences("train", "modules"), config.max_tokens)
            train = train[:-config.n_validation] + extra + train[-config.n_validation:]
        test = _filter_by_tokens(tokenizer, load_sentences("test"), config.max_tokens)[:config.n_test]
        n_pool = len(train) - config.n_validation
        self.pool_size = max(*config.n_grid, config.pilot_n)
        if max(self.pool_size, config.n_calibration) > n_pool or len(test) < config.n_test:
            raise ValueError(f"n_grid up to {max(config.n_grid)}, pilot_n={config.pilot_n}, "
                             f"n_calibration={config.n_calibration}, "
                             f"n_validation={config.n_validation} and n_test={config.n_test} need that many "
                             f"sentences of at most {config.max_tokens} tokens; the corpus has {len(train)} train "
                             f"and {len(test)} test")
        self.n_pool = n_pool
        self.train_data = encode_sentences(model, tokenizer, train, first, max_tokens=config.max_tokens)
        self.test_data = encode_sentences(model, tokenizer, test, first, max_tokens=config.max_tokens)
        self.base = TopLayers(model, first).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.device = device
        self.validation = torch.arange(n_pool, len(train), device=device)
        self.calibration = torch.arange(config.n_calibration, device=device)
        self.all_train = torch.arange(len(train), device=device)
        self.test_index = torch.arange(len(test), device=device)
        self.base_train = _embed_all(self.base, self.train_data, self.all_train, config.chunk_size)
        self.base_test = _embed_all(self.base, self.test_data, self.test_index, config.chunk_size)
        self._teachers: dict[str, tuple[nn.Module, _Teacher]] = {}

    def teacher(self, name: str) -> tuple[nn.Module, _Teacher]:
        """The calibrated teacher module and its embeddings (cached)."""
        name = check_choice("teacher", name, TEACHERS)
        if name not in self._teachers:
            c = self.config
            spec = c.teacher_spec(name)
            module, scale, shift = _calibrated_teacher(self.base, spec, _seed(c, "teacher", name), self.train_data,
                                                       self.calibration, self.base_train[self.calibration],
                                                       c.teacher_shift, c.chunk_size)
            train = _embed_all(module, self.train_data, self.all_train, c.chunk_size)
            test = _embed_all(module, self.test_data, self.test_index, c.chunk_size)
            sd = noise_sd(train[self.calibration], self.base_train[self.calibration], c.snr)
            info = _Teacher(scale, shift, sd, train, test, float((self.base_test - test).pow(2).mean()),
                            float(nn.functional.cosine_similarity(self.base_test, test, dim=-1).mean()))
            self._teachers[name] = (module, info)
            if self.progress is not None:
                self.progress(f"teacher {name} ({spec.label}): scale {scale:.4g}, embedding shift {shift:.4f}, "
                              f"noise sd {sd:.4g} (snr {c.snr}), base test MSE {info.base_test_mse:.3e}, "
                              f"base cosine {info.base_test_cosine:.4f}")
        return self._teachers[name]

    def pool(self, seed: int) -> torch.Tensor:
        """The shuffled training pool of one seed (its first ``n`` rows are the fit's sentences)."""
        gen = torch.Generator().manual_seed(_seed(self.config, "pool", seed))
        return torch.randperm(self.n_pool, generator=gen)[:self.pool_size].to(self.device)

    def noisy_targets(self, info: _Teacher, teacher: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy targets of the pool and of the validation set, for one teacher and seed (:func:`add_noise`)."""
        clean = torch.cat([info.train[self.pool(seed)], info.train[self.validation]])
        noisy = add_noise(clean, info.noise_sd, _seed(self.config, "noise", teacher, seed))
        return noisy[:self.pool_size], noisy[self.pool_size:]

    def setup(self, key: FitKey) -> FitSetup:
        """The student spec, teacher, noisy targets and training rows of one fit (no fitting)."""
        spec = {s.adapter: s for s in self.config.students}.get(key.adapter)
        if spec is None:
            raise ValueError(f"no student of adapter kind {key.adapter!r} in the configuration")
        teacher_module, info = self.teacher(key.teacher)
        pool_targets, val_targets = self.noisy_targets(info, key.teacher, key.seed)
        return FitSetup(key, spec, teacher_module, info, pool_targets[:key.n], val_targets, self.pool(key.seed)[:key.n])

    def init_seed(self, setup: FitSetup) -> int:
        """Seed of the student's initial factors (by student and replicate: shared by its teachers and sizes)."""
        return _seed(self.config, "init", setup.spec.label, setup.key.seed)

    def student(self, setup: FitSetup) -> nn.Module:
        """The fit's student: a peft model on a copy of the base, at its seeded initial factors (zero ``B``)."""
        return peft_student(self.base, setup.spec, self.init_seed(setup))

    def train_chunks(self, setup: FitSetup) -> Callable[[torch.Tensor], list]:
        """Chunks of the fit's training rows ``sub`` (positions into its targets)."""
        return lambda sub: self.train_data.chunks(setup.rows[sub], self.config.chunk_size)

    def adam(self, module: nn.Module, setup: FitSetup, lr: float) -> dict[str, object]:
        """The experiment's protocol: mini-batch Adam with early stopping on the validation set (in place)."""
        c, key = self.config, setup.key
        return fit_embeddings_adam(
            module, self.train_chunks(setup), key.n, setup.targets,
            self.train_data.chunks(self.validation, c.chunk_size), setup.val_targets, lr=lr, batch_size=c.batch_size,
            max_steps=c.max_steps, eval_every=c.eval_every, patience=c.patience,
            min_rel_improvement=c.min_rel_improvement,
            seed=_seed(c, "batches", key.teacher, setup.spec.label, key.n, key.seed))

    def test_scores(self, module: nn.Module, info: _Teacher) -> tuple[float, float]:
        """Test MSE (per coordinate) and mean cosine to the noise-free teacher embeddings."""
        predicted = _embed_all(module, self.test_data, self.test_index, self.config.chunk_size)
        return (float((predicted - info.test).pow(2).mean()),
                float(nn.functional.cosine_similarity(predicted, info.test, dim=-1).mean()))

    def fit(self, key: FitKey, lr: float) -> dict[str, object]:
        """Fit one student by Adam at learning rate ``lr`` and score it; one row with the columns :data:`COLUMNS`."""
        c = self.config
        start = time.perf_counter()
        setup = self.setup(key)
        spec, info = setup.spec, setup.info
        student = self.student(setup)
        module = student.base_model.model
        result = self.adam(module, setup, lr)
        test_mse, test_cosine = self.test_scores(module, info)
        row = {"teacher": key.teacher, "teacher_label": c.teacher_spec(key.teacher).label,
               "teacher_scale": info.scale, "teacher_shift": info.shift, "snr": c.snr, "noise_sd": info.noise_sd,
               "adapter": spec.adapter, "label": spec.label, "rank": spec.rank, "hyper_dim": spec.hyper_dim,
               "n_params": trainable_count(student), "n": key.n, "seed": key.seed,
               "test_mse": test_mse, "base_test_mse": info.base_test_mse,
               "relative_test_error": test_mse / info.base_test_mse, "test_cosine": test_cosine,
               "base_test_cosine": info.base_test_cosine, "lr": lr,
               "base_val_mse": float((self.base_train[self.validation] - setup.val_targets).pow(2).mean()),
               **result, "seconds": time.perf_counter() - start}
        return {name: row[name] for name in COLUMNS}


def run_pretrained_sample_efficiency(config: PretrainedFinetuneConfig, *, teachers: Sequence[str] = TEACHERS,
                                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                                     progress: Callable[[str], None] | None = None,
                                     model: nn.Module | None = None, tokenizer: Any = None) -> pd.DataFrame:
    """The pilot, then every fit of :func:`plan_fits` at the selected rates, in this process; one row per fit."""
    experiment = PretrainedExperiment(config, dtype=dtype, device=device, model=model, tokenizer=tokenizer,
                                      progress=progress)
    pilot = pd.DataFrame([experiment.fit(key, lr) for key, lr in plan_pilot(config, teachers)], columns=list(COLUMNS))
    rates = select_learning_rates(pilot)
    rows = [experiment.fit(key, rates[key.teacher, key.adapter]) for key in plan_fits(config, teachers)]
    return pd.DataFrame(rows, columns=list(COLUMNS))
