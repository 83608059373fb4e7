import re

import pytest
import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.methods.base import METHODS, Method, MethodConfig, all_methods, get_method_class, register
from slimtune.core.arch import Arch, find_targets, pattern_matches
from slimtune.methods.delta import Delta
from slimtune.recipe import MethodSpec

from tests.fixtures import tiny_bert, tiny_llama, tiny_vit

FIRST_METHODS = {"lora", "full", "linear-probe", "bitfit"}


def test_registry_holds_the_first_methods_with_descriptions():
    methods = all_methods()
    assert FIRST_METHODS <= set(methods)
    for name, cls in methods.items():
        assert cls.name == name and cls.description
        for field in cls.Config.model_fields.values():
            assert field.description, f"{name}: every field needs a description for `slimtune list methods`"


def test_unknown_method_is_one_clear_line():
    with pytest.raises(SlimtuneError, match=r"unknown method 'lorra'.*did you mean 'lora'"):
        get_method_class("lorra")


def test_registering_a_new_method_is_one_decorator_and_needs_no_trainer_change():
    @register
    class ScaleOnly(Method):
        name = "test-scale-only"
        description = "toy: one learned scalar"
        owned_marker = "toy_scale"

        def attach(self, model, arch):
            model.toy_scale = nn.Parameter(torch.ones(1))

    try:
        assert get_method_class("test-scale-only") is ScaleOnly
        model = tiny_bert()
        delta = Delta.from_specs([MethodSpec(name="test-scale-only", config=MethodConfig())])
        delta.attach(model, Arch.of(model))
        assert "toy_scale" in delta.trainable_parameters(model)
        assert model.toy_scale.requires_grad and not model.bert.embeddings.word_embeddings.weight.requires_grad
    finally:
        METHODS.pop("test-scale-only")


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("value", "bert.encoder.layer.0.attention.self.value", True),
        ("value", "bert.encoder.layer.0.attention.self.value_x", False),
        ("self.value", "bert.encoder.layer.0.attention.self.value", True),
        ("re:.*layer\\.1\\..*query", "bert.encoder.layer.1.attention.self.query", True),
        ("re:.*layer\\.1\\..*query", "bert.encoder.layer.0.attention.self.query", False),
    ],
)
def test_pattern_matching(pattern, name, expected):
    assert pattern_matches(pattern, name) is expected


@pytest.mark.parametrize("factory,expected", [(tiny_bert, ["query", "value"]), (tiny_llama, ["q_proj", "v_proj"]), (tiny_vit, ["q_proj", "v_proj"])])
def test_per_architecture_default_targets(factory, expected):
    model = factory()
    arch = Arch.of(model)
    patterns = arch.default_targets("attention_qv")
    assert patterns == expected
    found = find_targets(model, patterns)
    assert len(found) == 2 * arch.num_layers
    assert all(isinstance(m, nn.Linear) for _, m in found)


def test_unmatched_target_pattern_names_the_field_and_suggests():
    with pytest.raises(SlimtuneError, match=r"method.targets: pattern 'qeury' matches no Linear.*did you mean 'query'"):
        find_targets(tiny_bert(), ["qeury"])


def test_composing_methods_that_touch_the_same_parameters_is_refused():
    model = tiny_bert()
    specs = [MethodSpec(name="full", config=get_method_class("full").Config()), MethodSpec(name="bitfit", config=get_method_class("bitfit").Config())]
    with pytest.raises(SlimtuneError, match="both change"):
        Delta.from_specs(specs).attach(model, Arch.of(model))


def test_composing_lora_and_bitfit_trains_both_and_freezes_the_rest():
    model = tiny_bert()
    specs = [MethodSpec(name="lora", config=get_method_class("lora").Config()), MethodSpec(name="bitfit", config=get_method_class("bitfit").Config())]
    delta = Delta.from_specs(specs)
    delta.attach(model, Arch.of(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(delta.trainable_parameters(model))
    assert any(".lora_A" in n for n in trainable) and any(n.endswith(".bias") and "classifier" not in n for n in trainable)
    assert not any(n.endswith("query.base.weight") for n in trainable)
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= trainable


def test_bitfit_on_a_model_without_biases_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(SlimtuneError, match="no bias parameters"):
        Delta.from_specs([MethodSpec(name="bitfit", config=get_method_class("bitfit").Config())]).attach(model, Arch.of(model))


def test_selectors_train_what_they_say():
    """Exactly the selected parameters train: all of them (full), the head and pooler (linear
    probe), every bias plus the head and pooler (BitFit); each set written out independently."""
    names = [n for n, _ in tiny_bert().named_parameters()]
    head = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    biases = {n for n in names if n.rsplit(".", 1)[-1] == "bias"}
    # tiny BERT, 2 layers: embeddings LN + 8 per layer (q, k, v, attention output, its LN, FFN in,
    # FFN out, its LN) + pooler + classifier
    assert len(names) == 41 and len(biases) == 1 + 2 * 8 + 2
    for name, expected in [("full", set(names)), ("linear-probe", head), ("bitfit", biases | head)]:
        model = tiny_bert()
        Delta.from_specs([MethodSpec(name=name, config=get_method_class(name).Config())]).attach(model, Arch.of(model))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected, (name, sorted(trainable ^ expected)[:5])


def _every_method_but_full():
    from tests.methods.test_contract import TINY_FIELDS

    return [(name, TINY_FIELDS.get(name, {})) for name in all_methods() if name != "full"]


@pytest.mark.parametrize("first_full", [True, False], ids=["full-first", "full-last"])
@pytest.mark.parametrize(("name", "fields"), _every_method_but_full(), ids=lambda v: v if isinstance(v, str) else "")
def test_full_fine_tuning_composes_with_no_method_in_either_order(name, fields, first_full):
    """`full` trains every tensor, the other method's too: refused whichever comes first (claims
    alone, compared by name, missed wrapper methods and FacT/KAdaptation's shared factors)."""
    from tests.fixtures import attach

    specs = ["full", (name, fields)] if first_full else [(name, fields), "full"]
    # (a method that restructures the model, e.g. rank pruning removing components, composes with nothing)
    with pytest.raises(SlimtuneError, match=r"'(full|%s)' and '(full|%s)' both (change|train) |'linear-probe' cannot be combined with 'full'"
                       r"|'%s' restructures the model during training" % ((re.escape(name),) * 3)) as info:
        attach(tiny_bert(), *specs)
    assert "\n" not in str(info.value)
