"""Sample efficiency of LoRA, MH-LoRA and HoRA students on a real pretrained transformer (issue 14).

The toy experiment of :mod:`hmoe_sim.hora.finetune`, repeated on all-MiniLM-L6-v2 with real
English sentences (the ``pydoc_data`` corpus of :func:`hmoe_sim.hora.pretrained.load_sentences`):

* **Base**: MiniLM, frozen. Adapters go on the query and value projections of the last
  ``n_adapted_layers`` encoder layers; the hidden states entering the first adapted layer are
  computed once by the frozen model (:class:`~hmoe_sim.hora.pretrained.TopLayers`).
* **Teachers**: the base plus a hidden update of Q and V on the adapted layers --
  ``"shared"``: a HoRA update (rank 1, one-dimensional head embeddings: every head's factors
  on one line, structure shared across heads); ``"independent"``: an MH-LoRA update (rank 1,
  independent factors per head). ``A``-type factors are ``N(0, 1/E)``, ``B``-type factors
  ``N(0, s^2)`` (split evenly between the shared and generated parts for HoRA) and the scale
  ``s`` is solved for so that the teacher moves the mean-pooled embeddings of the first
  ``n_calibration`` training sentences by ``teacher_shift`` (:func:`embedding_shift`).
* **Students**: the base with freshly injected ``lora`` / ``mh-lora`` / ``hora`` adapters
  (zero ``B``), fitted by full-batch L-BFGS to the teacher's mean-pooled last hidden states
  (sentence embeddings before normalisation) of the first ``n`` sentences of one shuffled
  training pool per replicate (nested sizes), for ``n`` on ``n_grid``.
* **Scores** on the test split: the MSE to the teacher's embeddings (per coordinate), and the
  mean cosine similarity to them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.data import cell_seed
from hmoe_sim.hora.finetune import StudentSpec
from hmoe_sim.hora.inject import inject_adapters, trainable_parameters
from hmoe_sim.hora.lora import HoRALinear, MultiHeadLoRALinear
from hmoe_sim.hora.pretrained import TopLayers, hidden_states_before, load_minilm, load_sentences, tokenize

__all__ = ["TEACHERS", "EncodedSentences", "PretrainedFinetuneConfig", "config_summary", "embedding_shift",
           "encode_sentences", "fit_embeddings", "make_teacher", "run_pretrained_sample_efficiency"]

TEACHERS = ("shared", "independent")


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
        Training-set sizes in sentences (nested prefixes of one shuffled pool per replicate).
    n_seeds : int
        Replicates (training pool and student initialisation).
    n_test : int
        Test sentences (the first ones of the test split that fit ``max_tokens``).
    teacher_shift : float
        Size of the teacher's update: :func:`embedding_shift` of its embeddings from the base's.
    n_calibration : int
        The shift is measured on the first this many training sentences (a fixed set, so the
        teacher does not depend on ``n_grid`` or ``n_seeds``).
    max_iter : int
        L-BFGS iteration cap per fit.
    grad_tol : float
        Max-abs gradient below which a fit counts as converged.
    chunk_size : int
        Sentences per forward pass (length-sorted chunks, to cut padding).
    root_seed : int
        Seed of the teachers, the training pools and the student initialisations.
    students : tuple of StudentSpec
        The students (default: budgets as close as the ranks allow, see the module's notes).
    """

    n_adapted_layers: int = 1
    max_tokens: int = 32
    n_grid: tuple[int, ...] = (8, 16, 32, 64, 128)
    n_seeds: int = 3
    n_test: int = 256
    teacher_shift: float = 0.5
    n_calibration: int = 256
    max_iter: int = 50
    grad_tol: float = 1e-6
    chunk_size: int = 128
    root_seed: int = 0
    students: tuple[StudentSpec, ...] = field(default_factory=_default_students)

    def __post_init__(self) -> None:
        for name in ("n_adapted_layers", "max_tokens", "n_seeds", "n_test", "n_calibration", "max_iter",
                     "chunk_size"):
            check_positive_int(name, getattr(self, name))
        if not self.n_grid:
            raise ValueError("n_grid must hold at least one training-set size")
        for n in self.n_grid:
            check_positive_int("n_grid entry", n)
        check_positive_float("teacher_shift", self.teacher_shift)
        check_positive_float("grad_tol", self.grad_tol)
        if not self.students:
            raise ValueError("students must hold at least one StudentSpec")


def config_summary(config: PretrainedFinetuneConfig) -> dict[str, object]:
    """The configuration as plain values (for logs)."""
    out = asdict(config)
    out["students"] = [s.label for s in config.students]
    out["n_grid"] = list(config.n_grid)
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
def _embed_all(module: TopLayers, data: EncodedSentences, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    out = torch.empty((len(index), data.hidden.shape[-1]), dtype=data.hidden.dtype, device=data.hidden.device)
    for pos, hidden, mask in data.chunks(index, chunk_size):
        out[pos] = module.embed(hidden, mask)
    return out


def embedding_shift(moved: torch.Tensor, base: torch.Tensor) -> float:
    """RMS displacement of the embeddings over their RMS spread around the mean.

    ``sqrt(mean_i |moved_i - base_i|^2) / sqrt(mean_i |base_i - mean_j base_j|^2)``: 0.5 means
    that each sentence moves, on average, by half the typical distance between a base
    embedding and the base embeddings' centre.
    """
    spread = (base - base.mean(0)).pow(2).sum(-1).mean().sqrt()
    return float((moved - base).pow(2).sum(-1).mean().sqrt() / spread)


def make_teacher(base: TopLayers, teacher: str, *, scale: float, seed: int) -> TopLayers:
    """A copy of ``base`` with the teacher's hidden update on Q and V of every layer (see the module docstring)."""
    teacher = check_choice("teacher", teacher, TEACHERS)
    module = copy.deepcopy(base)
    options = {"hyper_dim": 1} if teacher == "shared" else {}
    inject_adapters(module, "hora" if teacher == "shared" else "mh-lora", 1, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed)
    a_std = 1 / base.config.hidden_size ** 0.5

    def fill(p: torch.Tensor, std: float) -> None:
        p.copy_(std * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, HoRALinear):
                fill(layer.shared_A, a_std / 2 ** 0.5)
                fill(layer.generator_A, a_std / 2 ** 0.5)
                fill(layer.shared_B, scale / 2 ** 0.5)
                fill(layer.generator_B, scale / 2 ** 0.5)
                fill(layer.head_embeddings, 1.0)
            elif isinstance(layer, MultiHeadLoRALinear):
                fill(layer.lora_A, a_std)
                fill(layer.lora_B, scale)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _calibrated_teacher(base: TopLayers, teacher: str, seed: int, data: EncodedSentences, index: torch.Tensor,
                        base_emb: torch.Tensor, target: float, chunk_size: int) -> tuple[TopLayers, float, float]:
    """Solve ``embedding_shift(teacher) = target`` for the scale (fixed-point on the log scale, 1e-3 relative)."""
    scale = 1.0
    for _ in range(40):
        module = make_teacher(base, teacher, scale=scale, seed=seed)
        shift = embedding_shift(_embed_all(module, data, index, chunk_size), base_emb)
        if abs(shift / target - 1) < 1e-3:
            return module, scale, shift
        scale *= target / shift
    raise RuntimeError(f"teacher {teacher!r}: no scale gives embedding shift {target} (last {shift:.4g} at "
                       f"scale {scale:.4g})")


def fit_embeddings(student: nn.Module, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   targets: torch.Tensor, *, max_iter: int = 50,
                   grad_tol: float = 1e-6) -> dict[str, float | int | bool]:
    """Least squares of ``student.embed`` on ``targets`` over the adapter tensors, by full-batch L-BFGS.

    The loss is the mean over sentences and coordinates of the squared error; chunks are
    accumulated into one gradient (strong Wolfe line search, history 20).

    Returns
    -------
    dict
        ``train_mse``, ``grad_max`` (max-abs gradient at the end), ``iterations`` and
        ``converged`` (``grad_max <= grad_tol``).
    """
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    n_values = targets.numel()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=check_positive_int("max_iter", max_iter),
                            tolerance_grad=grad_tol, tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=targets.dtype, device=targets.device)
        for pos, hidden, mask in chunks:
            loss = (student.embed(hidden, mask) - targets[pos]).pow(2).sum() / n_values
            loss.backward()
            total += loss.detach()
        return total

    opt.step(closure)
    loss = closure()
    grad_max = max(float(p.grad.abs().max()) for p in params)
    state = opt.state[params[0]]
    return {"train_mse": float(loss), "grad_max": grad_max, "iterations": int(state.get("n_iter", 0)),
            "converged": bool(grad_max <= grad_tol)}


def _filter_by_tokens(tokenizer: Any, sentences: Sequence[str], max_tokens: int) -> list[str]:
    lengths = [len(ids) for ids in tokenizer(list(sentences))["input_ids"]]
    return [s for s, n in zip(sentences, lengths, strict=True) if n <= max_tokens]


def run_pretrained_sample_efficiency(config: PretrainedFinetuneConfig, *, teachers: Sequence[str] = TEACHERS,
                                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                                     progress: Callable[[str], None] | None = None,
                                     model: nn.Module | None = None, tokenizer: Any = None) -> pd.DataFrame:
    """Fit every student on every nested training size; one row per fit.

    Parameters
    ----------
    config : PretrainedFinetuneConfig
    teachers : sequence of {"shared", "independent"}
    dtype, device
        Of the model and all computations.
    progress : callable, optional
        Receives one line per fit (and per teacher calibration).
    model, tokenizer : optional
        A loaded MiniLM (:func:`~hmoe_sim.hora.pretrained.load_minilm`); loaded when omitted.

    Returns
    -------
    pandas.DataFrame
        Columns ``teacher, teacher_scale, teacher_shift, adapter, label, rank, hyper_dim,
        n_params, n, seed, test_mse, base_test_mse, relative_test_error, test_cosine,
        base_test_cosine, train_mse, grad_max, iterations, converged, seconds`` (``base_*``:
        the frozen model against the teacher).
    """
    device = torch.device(device)
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm(dtype=dtype, device=device)
    model = model.to(device=device, dtype=dtype)
    n_layers = len(model.encoder.layer)
    if config.n_adapted_layers > n_layers:
        raise ValueError(f"n_adapted_layers={config.n_adapted_layers} exceeds the model's {n_layers} layers")
    first = n_layers - config.n_adapted_layers
    train = _filter_by_tokens(tokenizer, load_sentences("train"), config.max_tokens)
    test = _filter_by_tokens(tokenizer, load_sentences("test"), config.max_tokens)[:config.n_test]
    n_max = max(config.n_grid)
    if max(n_max, config.n_calibration) > len(train) or len(test) < config.n_test:
        raise ValueError(f"n_grid up to {n_max}, n_calibration={config.n_calibration} and n_test={config.n_test} "
                         f"need that many sentences of at most {config.max_tokens} tokens; the corpus has "
                         f"{len(train)} train and {len(test)} test")
    pools = []
    for rep in range(config.n_seeds):
        gen = torch.Generator().manual_seed(_seed(config, "pool", rep))
        pools.append(torch.randperm(len(train), generator=gen)[:n_max])
    calibration = torch.arange(config.n_calibration)
    used = torch.unique(torch.cat([*pools, calibration]))  # only these training sentences are encoded
    position = torch.full((len(train),), -1, dtype=torch.long)
    position[used] = torch.arange(len(used))
    pools = [position[pool].to(device) for pool in pools]
    calib_index = position[calibration].to(device)
    train_data = encode_sentences(model, tokenizer, [train[i] for i in used.tolist()], first,
                                  max_tokens=config.max_tokens)
    test_data = encode_sentences(model, tokenizer, test, first, max_tokens=config.max_tokens)
    base = TopLayers(model, first).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    test_index = torch.arange(len(test), device=device)
    base_test = _embed_all(base, test_data, test_index, config.chunk_size)
    base_calib = _embed_all(base, train_data, calib_index, config.chunk_size)

    rows: list[dict[str, object]] = []
    for teacher_name in teachers:
        teacher, scale, shift = _calibrated_teacher(base, teacher_name, _seed(config, "teacher", teacher_name),
                                                    train_data, calib_index, base_calib, config.teacher_shift,
                                                    config.chunk_size)
        teacher_test = _embed_all(teacher, test_data, test_index, config.chunk_size)
        base_mse = float((base_test - teacher_test).pow(2).mean())
        base_cos = float(nn.functional.cosine_similarity(base_test, teacher_test, dim=-1).mean())
        if progress is not None:
            progress(f"teacher {teacher_name}: scale {scale:.4g}, embedding shift {shift:.4f}, base test MSE "
                     f"{base_mse:.3e}, base cosine {base_cos:.4f}")
        for rep, pool in enumerate(pools):
            pool_targets = _embed_all(teacher, train_data, pool, config.chunk_size)
            for spec in config.students:
                for n in config.n_grid:
                    start = time.perf_counter()
                    student = copy.deepcopy(base).train(False)
                    options = {"hyper_dim": spec.hyper_dim} if spec.adapter == "hora" else {}
                    inject_adapters(student, spec.adapter, spec.rank, seed=_seed(config, "init", spec.label, rep),
                                    **options)
                    fit = fit_embeddings(student, train_data.chunks(pool[:n], config.chunk_size),
                                         pool_targets[:n], max_iter=config.max_iter, grad_tol=config.grad_tol)
                    predicted = _embed_all(student, test_data, test_index, config.chunk_size)
                    test_mse = float((predicted - teacher_test).pow(2).mean())
                    cosine = float(nn.functional.cosine_similarity(predicted, teacher_test, dim=-1).mean())
                    rows.append({"teacher": teacher_name, "teacher_scale": scale, "teacher_shift": shift,
                                 "adapter": spec.adapter, "label": spec.label, "rank": spec.rank,
                                 "hyper_dim": spec.hyper_dim, "n_params": trainable_parameters(student)["total"],
                                 "n": n, "seed": rep, "test_mse": test_mse, "base_test_mse": base_mse,
                                 "relative_test_error": test_mse / base_mse, "test_cosine": cosine,
                                 "base_test_cosine": base_cos, **fit, "seconds": time.perf_counter() - start})
                    if progress is not None:
                        progress(f"{teacher_name:11s} {spec.label:18s} n={n:5d} seed={rep} test_mse={test_mse:.3e} "
                                 f"cos={cosine:.4f} train_mse={fit['train_mse']:.2e} iters={fit['iterations']} "
                                 f"{time.perf_counter() - start:.1f}s")
    return pd.DataFrame(rows)
